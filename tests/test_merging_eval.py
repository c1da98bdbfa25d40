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


@pytest.fixture(scope="module")
def adapter_specialists(tmp_path_factory):
    """Two random LoRA adapters of the tiny model (non-zero B: each changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from reasonlite.models import load_model

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model, _ = load_model("tiny-random-llama", device="cpu")
        cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        out = tmp_path_factory.mktemp(f"adapter{seed}")
        get_peft_model(model, cfg).save_pretrained(out)
        paths.append(out)
    return paths


def _rows(path, questions):
    path.write_text("".join(json.dumps({"question": q, "answer": str(a)}) + "\n" for q, a in questions))
    return str(path)


def test_compare_routing_routes_each_task_to_its_specialist_and_costs_the_setups(adapter_specialists, tmp_path):
    fruit = [(f"A box holds {k} apples and {k + 1} pears. How many fruits are in the box?", 2 * k + 1)
             for k in range(3, 7)]
    trains = [(f"A train travels at {k} km per hour for {k + 2} hours. How far does the train travel?", k * (k + 2))
              for k in range(3, 7)]
    models = []
    for i, (rows, kind) in enumerate(((fruit, "fruit"), (trains, "train"))):
        models.append({"model": str(adapter_specialists[i]), "eval": {
            "data": _rows(tmp_path / f"{kind}-test.jsonl", rows[:2]),
            "dev": _rows(tmp_path / f"{kind}-dev.jsonl", rows[2:]), "format": "pal", "budget": 8}})
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": "tiny-random-llama", "models": models}))
    runner = CliRunner()
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(config), str(merged), "--no-progress"]).exit_code == 0
    out = tmp_path / "report"
    result = runner.invoke(app, ["merge-eval", str(config), str(merged), "--out", str(out), "--compare-routing"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compare_routing.json").read_text())
    rows = json.loads((out / "merge_eval.json").read_text())["rows"]
    assert report["routing_accuracy"] == 1.0
    assert report["confusion"] == {"task0": {"task0": 2, "task1": 0}, "task1": {"task0": 0, "task1": 2}}
    setups = {s["name"]: s for s in report["setups"]}
    # every question reached its own specialist, so routing scores exactly what each specialist scored
    assert setups["routed adapters"]["accuracy"] == [r["specialist_accuracy"] for r in rows]
    assert setups["merged"]["accuracy"] == [r["merged_accuracy"] for r in rows]
    # memory: one base + two small adapters < two full models; the merge is one model
    merged_mb, adapters_mb, models_mb = (setups[k]["resident_mb"] for k in ("merged", "routed adapters",
                                                                             "routed models"))
    assert merged_mb < adapters_mb < 1.2 * merged_mb and models_mb == pytest.approx(2 * merged_mb, rel=0.01)
    assert all(s["tokens_per_s"] > 0 for s in report["setups"])
    md = (out / "compare_routing.md").read_text()
    assert "**Recommendation**:" in md and report["recommendation"] in md


def test_the_recommendation_routes_when_the_merge_loses_a_skill():
    from slm_fusion.merging.compare import Comparison, Setup, recommend

    c = Comparison(tasks=["retail", "gsm8k"], specialist_accuracy=[0.5, 0.1], routing_accuracy=1.0, confusion={})
    c.setups = [Setup("merged", [0.05, 0.1], [0.1, 1.0], 540.0, 50.0),
                Setup("routed adapters", [0.5, 0.1], [1.0, 1.0], 600.0, 30.0),
                Setup("routed models", [0.5, 0.1], [1.0, 1.0], 1080.0, 40.0)]
    assert recommend(c).startswith("route to adapters: the merge keeps only 10% of retail")
    assert "1.11x the memory of one model" in recommend(c)
    c.setups[0] = Setup("merged", [0.48, 0.095], [0.96, 0.95], 540.0, 50.0)
    assert recommend(c).startswith("merge: the merged model keeps every skill (worst task 95%")
