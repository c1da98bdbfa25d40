"""Teacher synthesis (traces.synthesize, the TinyGSM recipe): reply parsing, every filter, the cache on a rerun, the
config errors and the build step, against the scripted teacher server (it scripts replies by the last user message,
which for synthesis is the op request built from the seed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from teacher_server import ServerState, ThreadedServer

from reasonlite.config import ConfigError, SynthesisOp, build_config, stage_hash
from reasonlite.data.example import Example
from reasonlite.sandbox import execute_many
from reasonlite.traces import build_trace_set
from reasonlite.traces.synthesize import (
    DROP_REASONS,
    EXAMPLE_SEED,
    OPS,
    _plan,
    jaccard,
    ngrams,
    parse_synthesis,
    pick_seeds,
    render_reply,
    synthesis_messages,
    synthesize,
)

SEED = Example(id="s1", question="A bakery sells muffins for $2 each. Omar buys 6 muffins and pays with a $20 bill. "
                                 "How much change does he get?", answer="8",
               program="def solution():\n    muffin_price = 2\n    muffins = 6\n    paid = 20\n"
                       "    cost = muffins * muffin_price\n    change = paid - cost\n    return change")
# its gold program disagrees with its gold answer: not a verified seed, never sent to the teacher
UNVERIFIED = Example(id="s2", question="Ana has 5 apples and eats 2. How many are left?", answer="3",
                     program="def solution():\n    return 5 + 2")
EVAL_QUESTION = ("A library lends 3 books to each of 9 students and keeps 14 books on the shelf for the teachers. "
                 "How many books does it have in all?")
GOOD = "A bakery sells bagels for $3 each. Omar buys 5 bagels and pays with a $50 bill. How much change does he get?"


def _reply(problem: str, body: str) -> str:
    return render_reply(problem, "def solution():\n" + body)


def _cfg(tmp_path, base_url: str = "http://127.0.0.1:9/v1", **synth):
    return build_config({
        "runs_dir": str(tmp_path / "runs"),
        "teacher": {"kind": "openai", "model": "teacher-1", "base_url": base_url, "max_retries": 0,
                    "concurrency": 2, "api_key_env": "RL_TEST_TEACHER_KEY", "cache_path": str(tmp_path / "c.sqlite")},
        "traces": {"style": "pal", "synthesize": {"enabled": True, **synth}},
        "student": {"model": "tiny-random-llama", "format": "pal"}})


def _request(seed: Example, op: str) -> str:
    return synthesis_messages(seed, op)[-1]["content"]


# ---------------------------------------------------------------------------------------------------------------
# Prompts and parsing
# ---------------------------------------------------------------------------------------------------------------

def test_every_op_has_a_worked_example_that_parses_and_runs():
    assert set(OPS) == set(get_args(SynthesisOp))
    parsed = {op: parse_synthesis(render_reply(o.example_problem, o.example_program)) for op, o in OPS.items()}
    assert all(p is not None for p in parsed.values())
    values = execute_many([EXAMPLE_SEED.program] + [p[1] for p in parsed.values()])
    assert [v.value for v in values] == [8, 8, 15, 6, 2, 8]  # seed; rephrase/irrelevant_context keep its answer


def test_prompt_format_system_worked_example_then_seed():
    messages = synthesis_messages(SEED, "extra_step")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"].startswith("Operation: extra step. ") and EXAMPLE_SEED.question in messages[1]["content"]
    assert messages[2]["content"].startswith("Problem: ") and "```python\ndef solution():" in messages[2]["content"]
    last = messages[-1]["content"]
    assert SEED.question in last and SEED.program in last and last.startswith("Operation: extra step. ")
    with pytest.raises(ValueError, match="traces.synthesize.ops"):
        synthesis_messages(SEED, "shuffle")


def test_parse_synthesis_reads_question_and_program():
    program = "def solution():\n    return 2 + 3"
    assert parse_synthesis(f"Problem: Two plus\nthree apples?\n```python\n{program}\n```") == ("Two plus three apples?",
                                                                                                program)
    assert parse_synthesis(f"Sure!\n**New problem:** Two plus three?\n\n```py\n{program}\n```") == ("Two plus three?",
                                                                                                    program)
    assert parse_synthesis(f"Question: Two plus three?\n{program}") == ("Two plus three?", program)  # no fence
    assert parse_synthesis(f"```python\n{program}\n```") is None  # no problem text
    assert parse_synthesis("Problem: Two plus three?\nThe answer is 5.") is None  # no program
    assert parse_synthesis("Problem:\n```python\n" + program + "\n```") is None  # empty problem
    assert parse_synthesis("") is None


def test_ngrams_and_jaccard():
    assert ngrams("A cat, a $3 hat.", 2) == {("a", "cat"), ("cat", "a"), ("a", "3"), ("3", "hat")}
    assert ngrams("Two words", 3) == {("two", "words")}  # shorter than n: the whole text is one gram
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5


def test_seeds_are_verified_gold_programs_and_ops_take_turns():
    no_program = Example(id="s3", question="q", answer="1")
    assert [s.id for s in pick_seeds([UNVERIFIED, no_program, SEED], max_seeds=None)] == ["s1"]
    assert pick_seeds([SEED, SEED.model_copy(update={"id": "s4"})], max_seeds=1) == [SEED]
    seeds = [SEED, SEED.model_copy(update={"id": "s4"})]
    assert _plan(seeds, ["rephrase", "new_numbers", "new_story"], per_seed=4) == {
        (0, "rephrase"): 2, (0, "new_numbers"): 1, (0, "new_story"): 1,
        (1, "new_numbers"): 2, (1, "new_story"): 1, (1, "rephrase"): 1}


# ---------------------------------------------------------------------------------------------------------------
# Filters and the cache, against the scripted teacher
# ---------------------------------------------------------------------------------------------------------------

def test_filters_drop_each_reason_keep_the_good_one_and_a_rerun_makes_no_call(tmp_path):
    replies = [
        _reply(GOOD, "    bagel_price = 3\n    bagels = 5\n    return 50 - bagels * bagel_price"),      # kept: 35
        _reply(GOOD + " Answer in dollars.", "    return 50 - 5 * 3"),             # near-duplicate of the kept one
        _reply(SEED.question + " Answer in dollars.", "    return 20 - 6 * 2"),    # near-duplicate of its seed
        _reply("Omar has 4 boxes of 7 muffins. How many muffins?", "    return boxes * 7"),     # NameError
        _reply("Omar has 4 boxes of 7 muffins. Which box is red?", "    return 'the first'"),   # text
        _reply("Omar has 4 boxes of 7 muffins. How many in each of two piles?", "    return [14, 14]"),  # a list
        _reply(EVAL_QUESTION.replace("does it have in all", "are there"), "    return 3 * 9 + 14"),  # eval 13-gram
        "Here is a new problem about muffins: Omar buys 6 muffins. The answer is 12.",           # no Problem: / code
    ]
    state = ServerState(script={_request(SEED, "new_numbers"): replies})
    with ThreadedServer(state) as server:
        cfg = _cfg(tmp_path, server.base_url, per_seed=len(replies), ops=["new_numbers"])
        examples, report = synthesize(cfg, [UNVERIFIED, SEED], [EVAL_QUESTION, "An unrelated question."])
        requests = state.requests
        again, report2 = synthesize(cfg, [UNVERIFIED, SEED], [EVAL_QUESTION])
        assert state.requests == requests == 1  # one n=8 request; the rerun is served from the SQLite cache
    assert set(state.served) == {_request(SEED, "new_numbers")}  # the unverified seed was never sent

    assert [(e.id, e.question, e.answer) for e in examples] == [("synth-s1-new_numbers-0", GOOD, "35")]
    assert examples[0].program.startswith("def solution():\n    bagel_price = 3")
    assert examples[0].metadata == {"source": "synthesized", "op": "new_numbers", "seed_id": "s1"}
    assert report["dropped"] == {"teacher_error": 0, "unparsed": 1, "not_executable": 1, "non_numeric": 1,
                                 "list_answer": 1, "eval_overlap": 1, "near_duplicate": 2}
    assert list(report["dropped"]) == list(DROP_REASONS)
    assert (report["seeds"], report["requested"], report["kept"]) == (1, 8, 1)
    assert report["kept_per_op"] == {"new_numbers": 1}
    assert report["cache"]["misses"] == 8 and report["cache"]["calls"] == 1

    assert again == examples and report2["dropped"] == report["dropped"]
    assert report2["cache"]["calls"] == 0 and report2["cache"]["hits"] == 8 and report2["cache"]["misses"] == 0


def test_a_malformed_response_is_not_cached_and_asked_again(tmp_path):
    seed = SEED.model_copy(update={"question": "[[malformed]] " + SEED.question})
    state = ServerState(script={_request(seed, "rephrase"): [_reply(GOOD, "    return 35")]})
    with ThreadedServer(state) as server:
        cfg = _cfg(tmp_path, server.base_url, per_seed=1, ops=["rephrase"])
        first, report = synthesize(cfg, [seed], [])
        second, report2 = synthesize(cfg, [seed], [])
    assert first == [] and report["dropped"]["teacher_error"] == 1
    assert [e.answer for e in second] == ["35"] and report2["cache"]["calls"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Config and the build step
# ---------------------------------------------------------------------------------------------------------------

def test_config_off_by_default_and_errors_name_the_field_and_fix(tmp_path):
    assert build_config({}).traces.synthesize.enabled is False
    with pytest.raises(ConfigError) as e:
        build_config({"traces": {"synthesize": {"enabled": True}}})
    assert "traces.synthesize.enabled" in str(e.value) and "teacher.kind: openai or hf" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config({"teacher": {"kind": "hf", "model": "tiny-random-llama"},
                      "traces": {"style": "cot", "synthesize": {"enabled": True}}, "student": {"format": "cot"}})
    assert "traces.style: pal" in str(e.value)
    with pytest.raises(ConfigError, match="traces.synthesize.ops"):
        _cfg(tmp_path, ops=["rephrase", "rephrase"])
    with pytest.raises(ConfigError, match="traces.synthesize.ops"):
        _cfg(tmp_path, ops=["shuffle"])
    off = _cfg(tmp_path).model_copy(deep=True)
    off.traces.synthesize.enabled = False
    assert stage_hash(_cfg(tmp_path), "traces") != stage_hash(off, "traces")


def test_build_trace_set_adds_synthesized_traces(tmp_path):
    from reasonlite.config import DataConfig
    from reasonlite.data.splits import load_splits

    train = load_splits(DataConfig(n_train=3))["train"]
    script = {ex.question: [f"```python\n{ex.program}\n```"] for ex in train}
    new_problem = "A farmer packs 7 crates with 9 pears each and gives away 5 pears. How many pears are left?"
    script[_request(train[0], "new_story")] = [_reply(new_problem, "    return 7 * 9 - 5")]
    with ThreadedServer(ServerState(script=script)) as server:
        cfg = _cfg(tmp_path, server.base_url, per_seed=1, ops=["new_story"], max_seeds=1)
        cfg.data.n_train = 3
        ts = build_trace_set(cfg, tmp_path / "out", show_progress=False)
    synth = [t for t in ts.traces if t.example_id.startswith("synth-")]
    assert len(ts.traces) == 4 and len(synth) == 1
    t = synth[0]
    assert (t.question, t.answer, t.status, t.style) == (new_problem, "58", "correct", "pal")
    assert t.program == "def solution():\n    return 7 * 9 - 5" and t.tokens
    m = ts.manifest
    assert m["synthesis"]["kept"] == 1 and m["synthesis"]["seeds"] == 1
    assert m["counts"]["correct"] == 3 and m["selected"] == 4  # teacher samples vs. selected traces


def test_build_without_synthesis_records_it_off(tmp_path):
    cfg = build_config({"runs_dir": str(tmp_path / "runs"), "data": {"n_train": 2},
                        "student": {"model": "tiny-random-llama", "format": "pal"}})
    assert build_trace_set(cfg, tmp_path / "out", show_progress=False).manifest["synthesis"] == {"enabled": False}
