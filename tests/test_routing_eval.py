"""`slm-fusion route-eval`: routing accuracy, confusion matrix, and the cascade quality-vs-cost curve."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from gateway_helpers import serve
from routing_upstream import make_upstream
from typer.testing import CliRunner

from slm_fusion.cli import app
from slm_fusion.routing.evaluate import cascade_curve

runner = CliRunner()


@pytest.fixture(scope="module")
def upstream():
    app_, _ = make_upstream()
    with serve(app_) as served:
        yield served


def _config(tmp_path: Path, url: str, extra: str) -> Path:
    models = "\n".join(
        f"  - {{name: {n}, backend: openai, model: {m}, base_url: {url}/v1}}"
        for n, m in (("retail", "small"), ("math", "answer-42"), ("general", "echo"))
    )
    p = tmp_path / "fusion.yaml"
    p.write_text(f"models:\n{models}\n{extra}")
    return p


def test_cascade_curve_replays_thresholds():
    outcomes = [  # small right+sure, small unsure, small's program failed, small sure but wrong
        {"small_answer": "7", "agreement": 1.0, "exec_error": None, "no_answer": False, "small_correct": True,
         "big_correct": False},
        {"small_answer": "0", "agreement": 1 / 3, "exec_error": None, "no_answer": False, "small_correct": False,
         "big_correct": True},
        {"small_answer": None, "agreement": 0.0, "exec_error": "runtime", "no_answer": True, "small_correct": False,
         "big_correct": True},
        {"small_answer": "7", "agreement": 1.0, "exec_error": None, "no_answer": False, "small_correct": False,
         "big_correct": True},
    ]
    curve = {str(c["threshold"]): c for c in cascade_curve(outcomes, thresholds=[0.0, 0.5, 1.0])}
    assert (curve["0.0"]["escalated"], curve["0.0"]["accuracy"]) == (0.25, 0.5)
    assert (curve["0.5"]["escalated"], curve["0.5"]["accuracy"]) == (0.5, 0.75)
    assert curve["small only"]["accuracy"] == 0.25 and curve["big only"]["accuracy"] == 0.75


def test_router_accuracy_is_counted_in_model_space_with_a_labels_map():
    """Gold rows may name classes (`math`) or models; decisions by class and by default meet on model names."""
    from types import SimpleNamespace

    from slm_fusion.routing.base import LabelledPrompt, RouteDecision
    from slm_fusion.routing.evaluate import evaluate_router

    class Labelled:
        name, kind = "sem", "semantic"
        cfg = SimpleNamespace(labels={"math": "smol-math", "general": "smol-gguf"})

        async def route(self, request):
            if "sum" in request.text:
                return RouteDecision(model="smol-math", score=0.9, reason="", router="sem", path=[], label="math")
            return RouteDecision(model="smol-gguf", score=0.1, reason="default", router="sem", path=[])

    rows = [LabelledPrompt(prompt="sum these", model="math"), LabelledPrompt(prompt="a poem", model="general"),
            LabelledPrompt(prompt="hello", model="smol-gguf"), LabelledPrompt(prompt="sum it", model="general")]
    result = asyncio.run(evaluate_router(Labelled(), rows, warmup=0))
    assert result["labels"] == ["smol-gguf", "smol-math"]  # no label names mixed in
    assert result["accuracy"] == 0.75
    assert result["confusion"]["smol-gguf"] == {"smol-gguf": 2, "smol-math": 1}


def test_route_eval_cli_writes_reports(tmp_path, upstream):
    data = tmp_path / "labelled.jsonl"
    rows = [
        {"prompt": "How many apples?", "model": "retail", "answer": "7"},
        {"prompt": "How many pears? [unsure]", "model": "retail", "answer": "42"},
        {"prompt": "Compute the total. [pal-broken]", "model": "math", "answer": "42"},
        {"prompt": "Write a poem", "model": "general"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(tmp_path, upstream.url, """virtual_models:
  by-words:
    router: rules
    default: general
    rules: [{model: math, keywords: [total]}, {model: retail, keywords: [apples]}]
  careful: {router: cascade, models: [retail, math], samples: 3, threshold: 0.6}
""")
    out = tmp_path / "eval"
    r = runner.invoke(app, ["route-eval", str(cfg), "--data", str(data), "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "route_eval.json").read_text())
    rules = result["routers"][0]
    assert rules["virtual_model"] == "by-words" and rules["accuracy"] == 0.75  # "pears" goes to the default
    assert rules["confusion"]["retail"] == {"general": 1, "math": 0, "retail": 1}
    lat = rules["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] < 1000 and lat["mean"] > 0  # measured per decision, in milliseconds
    cascade = result["cascades"][0]
    assert cascade["n"] == 3  # rows with a gold answer
    by_t = {str(c["threshold"]): c for c in cascade["curve"]}
    # small only: 1/3 right; at 0.6 the unsure and the failed-program rows go to the big model: all right.
    assert by_t["small only"]["accuracy"] == pytest.approx(1 / 3)
    assert by_t["0.6"]["escalated"] == pytest.approx(2 / 3) and by_t["0.6"]["accuracy"] == 1.0
    assert (out / "cascade_curve_careful.png").stat().st_size > 1000
    md = (out / "route_eval.md").read_text()
    assert "by-words" in md and "| gold \\ routed |" in md and "sent to big" in md
