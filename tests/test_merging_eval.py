"""`slm-fusion merge-eval`: the merged model and each specialist scored on each specialist's task set."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from slm_fusion.cli import app


@pytest.fixture(scope="module")
def specialist(tmp_path_factory):
    from reasonlite.models import load_model

    folder = tmp_path_factory.mktemp("spec") / "a"
    model, tokenizer = load_model("tiny-random-llama")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _task_file(path):
    rows = [{"question": f"A box holds {k} apples and {k + 1} pears. How many fruits?", "answer": str(2 * k + 1)}
            for k in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_merge_of_a_model_with_itself_scores_exactly_like_it(specialist, tmp_path):
    data = _task_file(tmp_path / "fruit.jsonl")
    cfg = {"merge_method": "linear", "models": [
        {"model": str(specialist), "parameters": {"weight": 0.5}, "eval": {"data": str(data), "format": "pal"}},
        {"model": str(specialist), "parameters": {"weight": 0.5},
         "eval": {"data": str(data), "format": "cot", "budget": 12}}]}
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(config), str(merged), "--no-progress"]).exit_code == 0
    result = runner.invoke(app, ["merge-eval", str(config), str(merged), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "merge_eval.json").read_text())
    assert [r["task"] for r in report["rows"]] == [f"{data} (pal)", f"{data} (cot)"]
    for row in report["rows"]:  # identical weights, greedy decoding: identical answers and token counts
        assert row["questions"] == 3
        assert row["merged_accuracy"] == row["specialist_accuracy"] and row["delta"] == 0
        assert row["merged_tokens"] == row["specialist_tokens"] > 0
    assert report["rows"][1]["merged_tokens"] <= 12 + 16  # the task's budget reached the evaluation
    assert "| task |" in (tmp_path / "report" / "merge_eval.md").read_text()
    assert (tmp_path / "report" / "task0-merged" / "result.json").exists()


def test_merge_eval_without_task_sets_says_how_to_add_one(specialist, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(specialist)}]}))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["merge-eval", str(config), str(tmp_path / "m")])
    assert result.exit_code == 2 and "eval: {data:" in result.stderr and len(result.stderr.strip().splitlines()) == 1
