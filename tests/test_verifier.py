"""Verifier (reasonlite.verifier): labelling by execution, the resumable sample cache, the value-head scorer learning a
separable toy set on the tiny random model, selection rules, verifier-vs-vote at equal samples in `evaluate`, and the
config / CLI errors."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from reasonlite.config import ConfigError, VerifierConfig, build_config
from reasonlite.controller import Sample
from reasonlite.data.example import Example
from reasonlite.evaluate import evaluate, render_markdown
from reasonlite.infer import Student
from reasonlite.verifier import (
    Verifier,
    read_samples,
    sample_training_data,
    select_index,
    selection_metrics,
    selection_outcomes,
    train_scorer,
)

EXAMPLES = [Example(id=f"q{i}", question=f"Sam has {i + 2} bags with 3 apples each. How many apples?",
                    answer=str((i + 2) * 3)) for i in range(4)]


def program(value: str, tag: str = "") -> str:
    return f"def solution():\n    total = {value}{tag}\n    return total\n"


class Script:
    """A generate_fn: each question cycles through its list of completions; records which questions were asked."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts, self.turn, self.asked = scripts, {q: 0 for q in scripts}, []

    def __call__(self, prompts, max_new_tokens, temperature, detect):
        out = []
        for prompt in prompts:
            question = next(q for q in self.scripts if q in prompt)
            self.asked.append(question)
            out.append(self.scripts[question][self.turn[question] % len(self.scripts[question])])
            self.turn[question] += 1
        return out


@pytest.fixture(scope="module")
def tokenizer():
    from reasonlite.models import load_tokenizer

    return load_tokenizer("tiny-random-llama")


def mixed_script(examples=EXAMPLES) -> Script:
    """Per question: right, off by one, an exec error, and no `return` value."""
    return Script({e.question: [program(e.answer), program(f"{e.answer} + 1"), program("1 / 0"),
                                "def solution():\n    total = 3\n    return None\n"] for e in examples})


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------


def test_samples_are_labelled_by_execution(tmp_path, tokenizer):
    student = Student(None, fmt="pal", tokenizer=tokenizer, generate_fn=mixed_script())
    rows = sample_training_data(student, EXAMPLES[:2], tmp_path / "samples.jsonl", k=4, progress=False)
    assert [r["id"] for r in rows] == ["q0", "q1"]
    for row in rows:
        assert [s["correct"] for s in row["samples"]] == [True, False, False, False]
        assert [s["status"] for s in row["samples"]] == ["ok", "ok", "exec_error", "no_answer"]
        assert row["samples"][0]["answer"] == row["gold"]
        assert row["samples"][0]["text"].startswith("def solution():")


def test_rerun_samples_only_questions_not_cached(tmp_path, tokenizer):
    path = tmp_path / "samples.jsonl"
    first = sample_training_data(Student(None, fmt="pal", tokenizer=tokenizer, generate_fn=mixed_script()),
                                 EXAMPLES[:2], path, k=4, progress=False)
    with path.open("a") as f:
        f.write('{"id": "q2", "question": "torn by a kill')  # a half-written last row
    script = mixed_script()
    rows = sample_training_data(Student(None, fmt="pal", tokenizer=tokenizer, generate_fn=script), EXAMPLES, path,
                                k=4, progress=False)
    assert set(script.asked) == {EXAMPLES[2].question, EXAMPLES[3].question}  # no new samples for q0, q1
    assert len(script.asked) == 8
    assert rows[:2] == first and [r["id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert list(read_samples(path)) == ["q0", "q1", "q2", "q3"]  # the torn row was dropped, its question redone


# --------------------------------------------------------------------------------------------------------------------
# scorer
# --------------------------------------------------------------------------------------------------------------------


def toy_rows(n: int, offset: int = 0) -> list[dict]:
    """Correct programs carry `# checked`, wrong ones (gold + 1) `# guessed`: separable by one token."""
    rows = []
    for i in range(offset, offset + n):
        gold = (i + 2) * 3
        rows.append({"id": f"t{i}", "question": f"Ann buys {i + 2} packs of 3 pens. How many pens?", "gold": str(gold),
                     "samples": [{"text": program(str(gold), "  # checked").strip(), "correct": True},
                                 {"text": program(str(gold + 1), "  # guessed").strip(), "correct": False}]})
    return rows


def test_scorer_learns_to_rank_correct_above_wrong_and_resumes(tmp_path):
    import torch

    torch.manual_seed(0)
    cfg = VerifierConfig(steps=40, learning_rate=5e-3, batch_size=8, lora_r=4, save_steps=20, max_length=128)
    rows = toy_rows(8)
    meta = train_scorer(rows, "tiny-random-llama", tmp_path / "v", cfg, progress=False, device="cpu")
    assert meta["samples"] == 16 and meta["positives"] == 8
    verifier = Verifier.load(tmp_path / "v", device="cpu")
    for row in rows + toy_rows(3, offset=20):  # trained questions and unseen ones
        right, wrong = verifier.score(row["question"], [s["text"] for s in row["samples"]])
        assert right > wrong, (row["id"], right, wrong)
    state = torch.load(tmp_path / "v" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 40 and len(state["losses"]) == 40
    assert sum(state["losses"][-5:]) / 5 < sum(state["losses"][:5]) / 5
    again = train_scorer(rows, "tiny-random-llama", tmp_path / "v", cfg, progress=False, device="cpu")
    assert torch.load(tmp_path / "v" / "checkpoint" / "state.pt", weights_only=False)["losses"] == state["losses"]
    assert again["final_loss"] == meta["final_loss"]  # resumed at step 40: nothing retrained


def test_cli_eval_with_a_trained_verifier(tmp_path):
    from typer.testing import CliRunner

    from reasonlite.cli import app

    cfg = VerifierConfig(steps=2, batch_size=2, lora_r=2, max_length=64)
    train_scorer(toy_rows(2), "tiny-random-llama", tmp_path / "v", cfg, progress=False, device="cpu")
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is 4 * 27?", "answer": "108"}) + "\n")
    out = CliRunner().invoke(app, ["eval", "tiny-random-llama", "--data", str(data), "--format", "pal", "--n", "2",
                                   "--select", "verifier", "--verifier", str(tmp_path / "v"), "--out",
                                   str(tmp_path / "ev"), "--set", "eval.max_new_tokens=8"])
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert result["meta"]["select"] == "verifier" and result["meta"]["verifier"] == str(tmp_path / "v")
    metrics = result["points"][0]["metrics"]
    assert {"first_accuracy", "vote_accuracy", "verifier_accuracy", "oracle_accuracy"} <= set(metrics)
    assert metrics["mean_samples"] == 2 and 0 <= result["points"][0]["records"][0]["verifier_score"] <= 1


def test_scorer_refuses_one_sided_data(tmp_path):
    from reasonlite.verifier import VerifierError

    rows = [{"id": "a", "question": "q", "gold": "1", "samples": [{"text": "def solution():\n    return 2",
                                                                  "correct": False}]}]
    with pytest.raises(VerifierError, match="all 1 distinct sampled programs are incorrect"):
        train_scorer(rows, "tiny-random-llama", tmp_path / "v", VerifierConfig(), progress=False, device="cpu")


# --------------------------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------------------------


def s(answer: str | None, status: str = "ok") -> Sample:
    return Sample(text="t", reasoning_tokens=1, answer_tokens=1, forced=False, answer=answer, status=status)


def test_selection_rules():
    samples = [s("7"), s("8"), s("8"), s(None, "exec_error"), s("6")]
    scores = [0.2, 0.1, 0.3, 0.99, 0.9]  # the exec error scores highest but has no answer
    assert select_index(samples, "greedy") == 0
    assert select_index(samples, "vote") == 1  # first sample of the majority answer
    assert select_index(samples, "verifier", scores) == 4
    assert select_index(samples, "verifier", [0.5, 0.5, 0.5, 0.5, 0.5]) == 0  # ties go to the earlier sample
    out = selection_outcomes(samples, "6", scores)
    assert out == {"first_correct": False, "vote_correct": False, "oracle_correct": True, "verifier_correct": True}
    records = [out, selection_outcomes(samples, "7", scores)]
    assert selection_metrics(records) == {"first_accuracy": 0.5, "vote_accuracy": 0.0, "verifier_accuracy": 0.5,
                                          "oracle_accuracy": 1.0}
    with pytest.raises(ValueError, match="one score per sample"):
        select_index(samples, "verifier", [0.1])


class FakeVerifier:
    """Scores a program that carries `# checked` high, anything else low."""

    path = None

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    def score_many(self, pairs):
        self.pairs += pairs
        return [0.9 if "# checked" in text else 0.1 for _, text in pairs]


def test_evaluate_compares_rules_on_the_same_samples(tokenizer):
    # q0, q1: the majority is wrong, the one right program is tagged; q2, q3: every sample right
    scripts = {}
    for i, e in enumerate(EXAMPLES):
        wrong = program(f"{e.answer} + 1")
        scripts[e.question] = ([wrong, wrong, program(e.answer, "  # checked"), program("1 / 0")] if i < 2
                               else [program(e.answer, "  # checked")] * 4)
    script = Script(scripts)
    student = Student(None, fmt="pal", tokenizer=tokenizer, generate_fn=script)
    fake = FakeVerifier()
    result = evaluate(student, EXAMPLES, n=4, progress=False, select="verifier", verifier=fake)
    m = result.points[0].metrics
    assert len(script.asked) == 16 and len(fake.pairs) == 16  # one set of 4 samples per question, all scored
    assert m["first_accuracy"] == 0.5 and m["vote_accuracy"] == 0.5
    assert m["verifier_accuracy"] == m["accuracy"] == 1.0 and m["oracle_accuracy"] == 1.0
    assert m["mean_samples"] == 4
    first = result.points[0].records[0]
    assert first["verifier_correct"] and not first["vote_correct"] and first["verifier_score"] == 0.9
    assert result.meta["select"] == "verifier" and result.meta["verifier"] is None
    report = render_markdown(result)
    assert "select: verifier" in report and "Selection at equal samples (n=4" in report


def test_evaluate_select_errors(tokenizer):
    student = Student(None, fmt="pal", tokenizer=tokenizer, generate_fn=mixed_script())
    with pytest.raises(ValueError, match="eval.verifier_path"):
        evaluate(student, EXAMPLES, n=4, progress=False, select="verifier")
    with pytest.raises(ValueError, match="select 'greedy' answers with one greedy sample"):
        evaluate(student, EXAMPLES, n=4, progress=False, select="greedy")
    greedy = evaluate(student, EXAMPLES[:1], n=1, progress=False, select="greedy")
    assert greedy.accuracy == 1.0 and greedy.meta["select"] == "greedy"


# --------------------------------------------------------------------------------------------------------------------
# config and CLI
# --------------------------------------------------------------------------------------------------------------------


def test_config_knobs_and_errors():
    cfg = build_config({})
    assert cfg.eval.select == "vote" and cfg.eval.verifier_path is None and cfg.verifier.k == 8
    with pytest.raises(ConfigError, match="eval.verifier_path is required when eval.select is 'verifier'"):
        build_config({"eval": {"select": "verifier"}})
    with pytest.raises(ConfigError, match="eval.n: 1"):
        build_config({"eval": {"select": "greedy", "n": 4}})
    assert build_config({"eval": {"select": "verifier", "verifier_path": "v", "n": 8}}).eval.verifier_path == "v"


def test_config_defaults_keep_the_eval_stage_hash():
    from reasonlite.config import stage_hash

    assert stage_hash(build_config({}), "eval") == stage_hash(build_config({"eval": {"select": "vote"}}), "eval")
    assert stage_hash(build_config({}), "eval") != stage_hash(
        build_config({"eval": {"select": "verifier", "verifier_path": "v"}}), "eval")


def test_cli_verifier_select_without_path_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from reasonlite.cli import app

    out = CliRunner().invoke(app, ["eval", "tiny-random-llama", "--select", "verifier", "--n", "4",
                                   "--out", str(tmp_path / "ev")])
    assert out.exit_code == 2
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "eval.verifier_path" in lines[0]


def test_cli_verifier_train_caches_samples_and_names_the_fix(tmp_path):
    from typer.testing import CliRunner

    from reasonlite.cli import app

    out_dir = tmp_path / "v"
    args = ["verifier", "train", "--student", "tiny-random-llama", "--out", str(out_dir),
            "--set", "verifier.n_questions=2", "--set", "verifier.k=2", "--set", "verifier.max_new_tokens=4",
            "--set", "data.n_train=2", "--set", f"runs_dir={tmp_path}"]
    out = CliRunner().invoke(app, args)
    # a random model never writes a right program: training is refused, the labelled samples are kept
    assert out.exit_code == 2, out.output
    assert "are incorrect" in out.output and "verifier.temperature" in out.output
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["samples"]) == 2 for r in rows)


# --------------------------------------------------------------------------------------------------------------------
# the gateway's reasoning layer: `select: verifier` uses reasonlite's selection
# --------------------------------------------------------------------------------------------------------------------


class ScriptedBackend:
    """The Backend surface the reasoning layer uses, answering every sample from a fixed list of completions."""

    def __init__(self, completions: list[str]) -> None:
        self.completions = completions

    def format_chat(self, messages):
        return "\n".join(m["content"] for m in messages) + "\n"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def generate(self, req):
        from slm_fusion.backends.base import Generation

        return [Generation(text=self.completions[i % len(self.completions)], finish_reason="stop", prompt_tokens=3,
                           completion_tokens=12) for i in range(req.n)]


def test_gateway_select_verifier_answers_with_the_top_scored_sample():
    import asyncio

    from pydantic import ValidationError

    from slm_fusion.backends.base import GenerationRequest
    from slm_fusion.config import ModelBase, ReasoningDefaults
    from slm_fusion.reasoning import ReasoningLayer

    with pytest.raises(ValidationError, match="reasoning.verifier_path is required"):
        ReasoningDefaults(select="verifier")
    model_cfg = ModelBase(name="student", model="student",
                          reasoning=ReasoningDefaults(format="pal", select="verifier", verifier_path="v", samples=4))
    layer = ReasoningLayer()
    fake = FakeVerifier()
    fake.score_samples = lambda question, samples: [0.9 if "# checked" in (x.program or "") else 0.1 for x in samples]
    layer._verifiers["v"] = fake
    backend = ScriptedBackend([program("8"), program("8"), program("7", "  # checked"), program("8")])
    gen = GenerationRequest(messages=[{"role": "user", "content": "What is 3 + 4?"}], max_tokens=64)
    assert layer.applies(gen.reasoning, model_cfg)  # select: verifier samples without vote: true
    [g] = asyncio.run(layer.generate(backend, gen, model_cfg))
    assert g.text == "7"  # the verifier's pick, not the majority's 8
    assert g.reasoning["select"] == "verifier" and g.reasoning["verifier_score"] == 0.9
    assert g.reasoning["votes"] == {"8": 3, "7": 1} and g.agreement == 0.25 and g.reasoning["samples"] == 4
