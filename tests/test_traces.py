"""Trace sets end to end (dataset, hf, openai teachers; kill -9 and resume) and the pieces on hand-made traces."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from teacher_server import ServerState, ThreadedServer

from reasonlite.config import build_config, stage_hash
from reasonlite.traces import Pair, Trace, TraceSet, build_trace_set
from reasonlite.traces.pairs import make_pairs, perturb_rationale, program_edits
from reasonlite.traces.prompts import parse_reply, pick_exemplars, teacher_messages
from reasonlite.traces.self_consistency import select, vote_and_grade
from reasonlite.traces.verify import execute_programs, grade

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K = REPO_ROOT.parent / "shared/data/gsm8k"


def _cfg(tmp_path, **sections):
    data = {"runs_dir": str(tmp_path / "runs"), "student": {"model": "tiny-random-llama", "format": "pal"}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build_config(data)


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------

def test_dataset_teacher_retail_math_pal_end_to_end(tmp_path):
    cfg = _cfg(tmp_path, data={"n_train": 12}, traces={"self_consistency": {"k": 2}})
    out = tmp_path / "runs" / "r" / "traces"
    ts = build_trace_set(cfg, out, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["all_traces.jsonl", "manifest.json", "pairs.jsonl",
                                                      "traces.jsonl"]
    m = ts.manifest
    assert m["counts"]["correct"] == 24 and m["teacher_accuracy"] == 1.0
    assert m["config_hash"] == stage_hash(cfg, "traces")  # the name of its stage folder, runs/_stages/traces-<hash>
    # k identical gold samples are selected once each
    assert len(ts.traces) == 12 and all(t.status == "correct" and t.program and t.tokens for t in ts.traces)
    assert m["agreement_histogram"] == {"1.00": 12}
    # the teacher never erred, so every pair is a counterfactual whose program runs to another answer
    assert len(ts.pairs) == 12 and all(p.counterfactual and p.rejected_answer != p.chosen_answer for p in ts.pairs)
    loaded = TraceSet.load(out)
    assert [t.id for t in loaded.traces] == [t.id for t in ts.traces] and len(loaded.all_traces) == 24
    assert loaded.pairs == ts.pairs and loaded.manifest == m


def test_the_traces_stage_cannot_read_a_knob_outside_its_hash(tmp_path, monkeypatch):
    """Handed the whole config, the stage reads only its view: a read of an eval knob (not in the traces hash, so a
    change to it would reuse this cached trace set) fails naming the knob and the fix, before anything is written."""
    from reasonlite.config import StageConfigError
    from reasonlite.traces import build

    monkeypatch.setattr(build, "_augment", lambda cfg, selected, tokenizer: cfg.budget.reasoning_budget)
    with pytest.raises(StageConfigError, match=r"the traces stage read budget\.reasoning_budget, .* add "
                                               r"'budget\.reasoning_budget' to STAGE_SECTIONS\['traces'\]"):
        build_trace_set(_cfg(tmp_path, data={"n_train": 4}), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("style,fmt", [("cot", "cot"), ("pal", "pal")])
def test_dataset_teacher_gsm8k_gold_traces_verify(tmp_path, style, fmt):
    assert (GSM8K / "train.jsonl").exists(), f"GSM8K not found at {GSM8K}"
    cfg = _cfg(tmp_path, data={"source": "gsm8k", "path": str(GSM8K), "n_train": 25},
               traces={"style": style}, student={"format": fmt})
    ts = build_trace_set(cfg, tmp_path / "out", show_progress=False)
    gold_has_field = {t.example_id: bool(t.program if style == "pal" else t.rationale) for t in ts.all_traces}
    for t in ts.all_traces:
        # every gold trace the dataset has verifies; an example without a gold program has nothing to verify
        assert t.status == ("correct" if gold_has_field[t.example_id] else "no_answer"), (t.id, t.error)
    assert len(ts.traces) == sum(gold_has_field.values()) >= 15


def test_hf_teacher_tiny_random_filters_garbage(tmp_path):
    """A random model writes garbage: it is classified (exec_error / no_answer) and nothing is selected."""
    statuses = set()
    for style, fmt in (("pal", "pal"), ("cot", "cot")):
        cfg = _cfg(tmp_path, data={"n_train": 3},
                   teacher={"kind": "hf", "model": "tiny-random-llama", "max_tokens": 12, "batch_size": 6,
                            "cache_path": str(tmp_path / "hf_cache.sqlite")},
                   traces={"style": style, "self_consistency": {"k": 2}}, student={"format": fmt})
        ts = build_trace_set(cfg, tmp_path / style, show_progress=False)
        statuses |= {t.status for t in ts.all_traces}
        assert ts.traces == [] and ts.manifest["cache"]["misses"] == 6
        assert ts.manifest["teacher_accuracy"] == 0.0
    assert {"exec_error", "no_answer"} <= statuses


@pytest.mark.integration
def test_hf_teacher_smollm2_statuses_include_wrong(tmp_path):
    cfg = _cfg(tmp_path, data={"n_train": 3},
               teacher={"kind": "hf", "model": "smollm2-135m-instruct", "max_tokens": 48, "batch_size": 6},
               traces={"style": "pal", "few_shot": 1, "self_consistency": {"k": 2}})
    ts = build_trace_set(cfg, tmp_path / "out", show_progress=False)
    statuses = {t.status for t in ts.all_traces}
    assert "wrong" in statuses or "exec_error" in statuses, statuses
    assert all(t.status == "correct" for t in ts.traces)


def _scripted_retail(n: int) -> tuple[dict[str, list[str]], list]:
    from reasonlite.config import DataConfig
    from reasonlite.data.splits import load_splits

    examples = load_splits(DataConfig(n_train=n))["train"]
    script = {}
    for ex in examples:
        wrong = ex.program.replace("return answer", "return answer + 1")
        script[ex.question] = [f"```python\n{ex.program}\n```", f"```python\n{wrong}\n```"]
    return script, examples


def _openai_cfg_yaml(tmp_path, base_url: str, n: int) -> Path:
    cfg = {"runs_dir": str(tmp_path / "runs"),
           "data": {"n_train": n},
           "teacher": {"kind": "openai", "model": "teacher-1", "base_url": base_url, "concurrency": 2,
                       "max_retries": 2, "api_key_env": "RL_TEST_TEACHER_KEY",
                       "cache_path": str(tmp_path / "cache.sqlite")},
           "traces": {"style": "pal", "self_consistency": {"k": 2}},
           "student": {"model": "tiny-random-llama", "format": "pal"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cache_rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def test_openai_build_killed_mid_run_resumes_without_paying_twice(tmp_path):
    n, k = 12, 2
    script, examples = _scripted_retail(n)
    state = ServerState(script=script, latency_s=0.1)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    out = tmp_path / "out"
    with ThreadedServer(state) as server:
        cfg_path = _openai_cfg_yaml(tmp_path, server.base_url, n)
        state.hold(after=10)
        cmd = [sys.executable, "-m", "reasonlite.cli", "traces", str(cfg_path), "--out", str(out)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        # wait until the served completions are all committed and the rest of the run is parked on the server
        while not (state.served_total >= 10 and _cache_rows(tmp_path / "cache.sqlite") == state.served_total
                   and state.requests > state.statuses[200]):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the build never reached the hold point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = state.served_total
        assert 10 <= killed_at < n * k and not out.exists()  # killed mid-run: no folder, only the cache
        assert _cache_rows(tmp_path / "cache.sqlite") == killed_at
        state.release_held()  # parked requests answer 503 to a dead client, uncounted

        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        # every (question, sample) was generated exactly once across the killed run and the resumed one
        assert state.served == {ex.question: k for ex in examples}
    ts = TraceSet.load(out)
    assert len(ts.all_traces) == n * k and ts.manifest["counts"]["correct"] == n
    assert ts.manifest["counts"]["wrong"] == n and len(ts.traces) == n
    assert ts.manifest["cache"]["hits"] == killed_at and ts.manifest["cache"]["misses"] == n * k - killed_at
    assert ts.manifest["cache"]["est_tokens_saved"] > 0
    # real negatives (the scripted wrong programs) were paired, no counterfactual needed
    assert len(ts.pairs) == n and not any(p.counterfactual for p in ts.pairs)


# ---------------------------------------------------------------------------------------------------------------
# Pieces on hand-made traces
# ---------------------------------------------------------------------------------------------------------------

def _trace(i: int, answer: str | None, *, qid="q1", gold: str | None = "10", style="cot", status=None,
           rationale=None, program=None, tokens=None) -> Trace:
    t = Trace(id=f"{qid}#{i}", example_id=qid, question="Q?", gold=gold, style=style, text="",
              rationale=rationale if rationale is not None else f"steps {i}. The answer is {answer}.",
              program=program, answer=answer, sample_index=i, tokens=tokens)
    if status:
        t.status = status
    return t


def test_vote_with_gold_grades_against_gold_and_reports_agreement():
    traces = [_trace(0, "10"), _trace(1, "12"), _trace(2, "12"), _trace(3, None)]
    vote = vote_and_grade(traces, "10", min_agreement=0.0)
    assert vote.label == "10" and not vote.pseudo_label and vote.agreement == 0.5  # 2 of ALL 4 samples say 12
    assert [t.status for t in traces] == ["correct", "wrong", "wrong", "no_answer"]
    assert all(t.agreement == 0.5 for t in traces)


def test_vote_min_agreement_drops_unsure_questions():
    traces = [_trace(0, "10"), _trace(1, "11"), _trace(2, "12")]
    assert not vote_and_grade(traces, "10", min_agreement=0.5).passed
    assert vote_and_grade([_trace(0, "10"), _trace(1, "10"), _trace(2, "12")], "10", min_agreement=0.5).passed


def test_vote_without_gold_makes_a_pseudo_label():
    traces = [_trace(i, a, gold=None) for i, a in enumerate(["7", "7.0", "8", None])]
    vote = vote_and_grade(traces, None, pseudo_label=True)
    assert vote.label == "7" and vote.pseudo_label and vote.agreement == 0.5
    assert [t.status for t in traces] == ["correct", "correct", "wrong", "no_answer"]
    assert all(t.pseudo_label and t.label == "7" for t in traces[:3])
    off = [_trace(i, a, gold=None) for i, a in enumerate(["7", "8"])]
    vote_off = vote_and_grade(off, None, pseudo_label=False)
    assert vote_off.label is None and [t.status for t in off] == ["unverified", "unverified"]
    assert select(off, "all_correct") == [] and len(select(off, "all_correct", verify=False)) == 2


def test_selection_policies():
    traces = [_trace(0, "10", tokens=30, rationale="long way. The answer is 10."),
              _trace(1, "12", tokens=5), _trace(2, "10", tokens=12, rationale="short. The answer is 10."),
              _trace(3, "10", tokens=30, rationale="long way. The answer is 10.")]
    vote_and_grade(traces, "10")
    assert [t.sample_index for t in select(traces, "all_correct")] == [0, 2]  # the duplicate text is kept once
    assert [t.sample_index for t in select(traces, "one_per_question")] == [0]
    assert [t.sample_index for t in select(traces, "shortest_correct")] == [2]
    with pytest.raises(ValueError, match="selection"):
        select(traces, "best")


def test_pal_traces_are_executed_and_graded():
    progs = {"ok": "def solution():\n    return 4 * 2.5\n", "wrong": "def solution():\n    return 4 + 2\n",
             "crash": "def solution():\n    return 1 / 0\n", "syntax": "def solution(:\n    return 1\n"}
    traces = [_trace(i, None, style="pal", program=p, rationale=None) for i, p in enumerate(progs.values())]
    traces.append(_trace(9, None, style="pal", program=None, rationale=None))
    execute_programs(traces)
    for t in traces:
        grade(t, "10")
    assert [t.status for t in traces] == ["correct", "wrong", "exec_error", "exec_error", "no_answer"]
    assert traces[0].answer == "10" and traces[2].error.startswith("runtime")


def test_parse_reply_for_each_style_and_malformed_text():
    assert parse_reply("cot", "3 * 4 = 12.\nThe answer is 12.").answer == "12"
    assert parse_reply("step_by_step", "Rationale: 3 * 4 = 12.\nAnswer: $12").answer == "12"
    assert parse_reply("step_by_step", "Rationale: 3 * 4 = 12.\nAnswer: 12").rationale == "3 * 4 = 12."
    pal = parse_reply("pal", "Sure!\n```python\ndef solution():\n    return 3\n```\nDone.")
    assert pal.program == "def solution():\n    return 3"
    for style in ("cot", "pal", "step_by_step"):
        bad = parse_reply(style, "")
        assert bad.answer is None and bad.program is None
    assert parse_reply("pal", "I cannot write code.").program is None


def test_teacher_messages_put_exemplars_as_turns(tmp_path):
    msgs = teacher_messages("How much?", "pal", pick_exemplars(2, "pal"))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"].startswith("```python\ndef solution():") and msgs[-1]["content"] == "How much?"
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"question": "1+1?", "answer": "2", "rationale": "1 + 1 = 2."}) + "\n")
    sbs = teacher_messages("Q", "step_by_step", pick_exemplars(4, "step_by_step", str(shots)))
    assert sbs[2]["content"] == "Rationale: 1 + 1 = 2.\nAnswer: 2"
    with pytest.raises(ValueError, match="few_shot_path.*program"):
        pick_exemplars(1, "pal", str(shots))


def test_counterfactual_program_edits_change_one_token_and_the_answer():
    import random

    program = "def solution():\n    price = 12\n    count = 3\n    total = price * count\n    return total - 6\n"
    edits = program_edits(program, random.Random(0), limit=10)
    assert edits
    for edited, desc in edits:
        diff = [(a, b) for a, b in zip(program.splitlines(), edited.splitlines()) if a != b]
        assert len(diff) == 1 and len(edited.splitlines()) == len(program.splitlines()), desc
    chosen = _trace(0, "30", style="pal", program=program, rationale=None, gold="30")
    grade(chosen, "30")
    pairs = make_pairs([chosen], [chosen], counterfactual=True)
    assert len(pairs) == 1 and pairs[0].counterfactual and pairs[0].rejected_answer != "30"
    from reasonlite.sandbox import execute

    assert str(execute(pairs[0].rejected).value).rstrip("0").rstrip(".") == pairs[0].rejected_answer


def test_counterfactual_rationale_is_consistent():
    import random

    rationale = "Each box has 4 * 5 = 20 pens.\nTwo boxes hold 20 * 2 = 40 pens.\nThe answer is 40."
    rejected, new_answer, _ = perturb_rationale(rationale, "40", random.Random(1))
    lines = rejected.splitlines()
    assert lines[0] == "Each box has 4 * 5 = 20 pens."  # earlier steps untouched
    assert lines[1] == f"Two boxes hold 20 * 2 = {new_answer} pens." and lines[2] == f"The answer is {new_answer}."
    assert new_answer != "40"


def test_pairs_prefer_real_negatives():
    traces = [_trace(0, "10"), _trace(1, "12"), _trace(2, "13"), _trace(3, "14")]
    vote_and_grade(traces, "10")
    pairs = make_pairs(traces, [traces[0]])
    assert len(pairs) == 2 and not any(p.counterfactual for p in pairs)  # capped at MAX_PAIRS_PER_QUESTION
    assert pairs[0] == Pair(example_id="q1", question="Q?", style="cot", chosen=traces[0].rationale,
                            rejected=traces[1].rationale, chosen_answer="10", rejected_answer="12",
                            chosen_id="q1#0", rejected_id="q1#1")
    assert make_pairs([traces[0]], [traces[0]], counterfactual=False) == []
