"""Evaluation: metrics from scripted students (perfect, erroring, budget-capped), the report files, the GSM8K CLI path
on the tiny model, comparison tables and bad input."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from reasonlite.data import generate_retail_math
from reasonlite.evaluate import EvalResult, compare_runs, eval_command, evaluate, write_report
from reasonlite.infer import Student


@pytest.fixture(scope="module")
def tokenizer():
    from reasonlite.models import load_tokenizer

    return load_tokenizer("tiny-random-llama")


@pytest.fixture(scope="module")
def examples():
    return generate_retail_math(12, seed=3)


def oracle(examples, fmt, corrupt=()):
    """A scripted generate_fn that writes each question's gold rationale/program (or a broken one for `corrupt`)."""
    by_question = {e.question: e for e in examples}

    def generate(prompts, max_new_tokens, temperature, detect):
        out = []
        for prompt in prompts:
            if prompt.rstrip().endswith("The answer is"):  # a forced continuation
                out.append(" 0.")
                continue
            ex = next(e for q, e in by_question.items() if q in prompt)
            if ex.id in corrupt:
                out.append("def solution():\n    return 1 / 0\n" if fmt == "pal" else "I am not sure. The answer is -1.")
            else:
                out.append(ex.program if fmt == "pal" else ex.rationale)
        return out

    return generate


@pytest.mark.parametrize("fmt", ["cot", "pal"])
def test_perfect_student_reaches_100_percent(tokenizer, examples, fmt):
    student = Student(None, fmt=fmt, tokenizer=tokenizer, generate_fn=oracle(examples, fmt))
    result = evaluate(student, examples, progress=False, data_name="retail")
    m = result.points[0].metrics
    assert result.accuracy == 1.0 and m["correct"] == m["total"] == len(examples)
    assert m["exec_error_rate"] == 0 and m["forced_rate"] == 0 and m["no_answer_rate"] == 0
    assert m["mean_tokens"] > 10 and m["p95_tokens"] >= m["mean_tokens"] * 0.5
    assert m["mean_answer_tokens"] > 0 and m["mean_reasoning_tokens"] > m["mean_answer_tokens"]
    templates = result.points[0].breakdown["template"]
    assert sum(t["total"] for t in templates.values()) == len(examples)
    assert all(t["accuracy"] == 1.0 for t in templates.values())


def test_exec_errors_and_budgets_are_counted(tokenizer, examples):
    corrupt = {examples[0].id, examples[1].id, examples[2].id}
    student = Student(None, fmt="pal", tokenizer=tokenizer, generate_fn=oracle(examples, "pal", corrupt))
    result = evaluate(student, examples, progress=False)
    m = result.points[0].metrics
    assert m["exec_error_rate"] == pytest.approx(3 / 12) and m["accuracy"] == pytest.approx(9 / 12)
    bad = [r for r in result.points[0].records if r["status"] == "exec_error"]
    assert {r["id"] for r in bad} == corrupt and all("runtime" in r["error"] for r in bad)

    cot = Student(None, fmt="cot", tokenizer=tokenizer, generate_fn=oracle(examples, "cot"), answer_tokens=4)
    capped = evaluate(cot, examples, budgets=[None, 8], progress=False)
    free, tight = (p.metrics for p in capped.points)
    assert [p.budget for p in capped.points] == [None, 8]
    assert tight["forced_rate"] == 1.0 and free["forced_rate"] == 0.0  # gold rationales are all > 8 tokens
    assert tight["mean_tokens"] <= 8 + 4 < free["mean_tokens"]
    assert tight["accuracy"] < free["accuracy"] == 1.0  # the forced " 0." answers are wrong


def test_report_files(tmp_path, tokenizer, examples):
    student = Student(None, fmt="cot", tokenizer=tokenizer, generate_fn=oracle(examples, "cot", {examples[0].id}))
    result = evaluate(student, examples, budgets=[None, 16], progress=False, data_name="retail")
    paths = write_report(result, tmp_path / "rep")
    data = json.loads(paths["json"].read_text())
    assert len(data["points"]) == 2 and len(data["points"][0]["records"]) == len(examples)
    md = paths["md"].read_text()
    assert "## Summary" in md and "## Accuracy by template" in md and "| budget 16 |" in md and "## First misses" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = EvalResult.load(tmp_path / "rep")
    assert again.accuracy == result.accuracy == pytest.approx(11 / 12)
    rows = compare_runs([tmp_path / "rep", paths["json"]], show=False)
    assert len(rows) == 4 and rows[0]["accuracy_delta_vs_first"] == 0.0


def test_empty_eval_set_is_an_error(tokenizer):
    student = Student(None, fmt="cot", tokenizer=tokenizer, generate_fn=lambda *a: [])
    with pytest.raises(ValueError, match="eval set is empty"):
        evaluate(student, [], progress=False)


def test_config_target_without_a_trained_model(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: nothing-here\nruns_dir: {tmp_path / 'runs'}\n")
    with pytest.raises(FileNotFoundError, match="reasonlite train"):
        eval_command(str(cfg))


def test_gsm8k_slice_on_the_tiny_model(tmp_path):
    from reasonlite.data.splits import default_gsm8k_dir

    if not (default_gsm8k_dir() / "test.jsonl").exists():
        pytest.skip("GSM8K test file not laid out beside the repo")
    import torch

    torch.set_num_threads(1)
    result = eval_command("tiny-random-llama", data="gsm8k", fmt="cot", budgets="6", limit=20, out=tmp_path / "ev",
                          overrides=["eval.batch_size=20", "budget.answer_tokens=3"])
    m = result.points[0].metrics
    assert m["total"] == 20 and len(result.points[0].records) == 20
    assert m["mean_tokens"] <= 6 + 3 and m["forced_rate"] == 1.0
    assert {r["gold"] for r in result.points[0].records} >= {"18", "3"}  # the first GSM8K test answers
    assert all((tmp_path / "ev" / f).exists() for f in ("result.json", "report.md", "accuracy_vs_tokens.png"))


def test_cli_reports_bad_budget(tmp_path):
    from typer.testing import CliRunner

    from reasonlite.cli import app

    out = CliRunner().invoke(app, ["eval", "tiny-random-llama", "--budgets", "2", "--limit", "1",
                                   "--out", str(tmp_path / "x")])
    assert out.exit_code == 2 and "budget=2" in out.output


def test_cli_calculator_flag_reaches_the_student(tmp_path):
    import json

    from typer.testing import CliRunner

    from reasonlite.cli import app

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is 4 * 27?", "answer": "108"}) + "\n")
    out = CliRunner().invoke(app, ["eval", "tiny-random-llama", "--data", str(data), "--format", "cot",
                                   "--budgets", "8", "--calculator", "--out", str(tmp_path / "ev")])
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert result["meta"]["calculator"] is True
    assert "calculator: True" in (tmp_path / "ev" / "report.md").read_text()
    refused = CliRunner().invoke(app, ["eval", "tiny-random-llama", "--data", str(data), "--format", "pal",
                                       "--calculator", "--out", str(tmp_path / "ev2")])
    assert refused.exit_code == 2 and "calculator=True is for cot/answer students" in refused.output
