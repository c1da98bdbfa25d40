"""Semantic and classifier routers with the real all-MiniLM-L6-v2 embeddings (loaded once per session)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import joblib
import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from slm_fusion.backends.base import Generation
from slm_fusion.cli import app as cli_app
from slm_fusion.config import FusionConfig
from slm_fusion.routing import RoutingConfigError, RoutingRequest, build_routers, load_labelled
from slm_fusion.routing.classifier import load_classifier
from slm_fusion.routing.embeddings import get_embedder

LABELLED = Path(__file__).resolve().parents[1] / "examples" / "routing_labelled.jsonl"
MODELS = [{"name": n, "backend": "openai", "model": n, "base_url": "http://127.0.0.1:9/v1"}
          for n in ("retail", "math", "general", "big")]
PROMPTS = {
    "retail": "Corner Grocer sells apples for $0.75 each. A customer buys 14 apples and pays with a $20 bill. "
              "How many dollars of change does the customer get?",
    "math": "Tom has 3 times as many marbles as Jerry. Together they have 48 marbles. How many does Jerry have?",
    "general": "Can you write me a short poem about my cat sleeping in the sun?",
}


@pytest.fixture(scope="session")
def embedder():
    return get_embedder()


@pytest.fixture(scope="session")
def classifier_file(tmp_path_factory, embedder) -> Path:
    """Trained once through the CLI (`slm-fusion router train`); the exemplar embeddings are already cached."""
    out = tmp_path_factory.mktemp("router") / "router.pkl"
    r = CliRunner().invoke(cli_app, ["router", "train", "--data", str(LABELLED), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "calibrated=True" in r.output and "retail" in r.output
    return out


@pytest.fixture(scope="session", autouse=True)
def _warm_cache(embedder):
    embedder.embed([row.prompt for row in load_labelled(LABELLED)])


def _req(text: str) -> RoutingRequest:
    return RoutingRequest(messages=[{"role": "user", "content": text}], text=text)


def _build(routers: dict, virtual: dict | None = None, **extra):
    cfg = FusionConfig.model_validate({"models": MODELS, "routers": routers,
                                       "virtual_models": virtual or {n: {"router": n} for n in routers}, **extra})
    return build_routers(cfg)


def test_fast_path_matches_sentence_transformers(embedder):
    texts = ["How many pens are left?", "Write a haiku about rain."]
    ours = embedder.embed(texts)
    reference = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == (2, embedder.dim) == (2, 384)
    assert np.allclose(ours, reference, atol=1e-4)
    hits = embedder.hits
    embedder.embed_one(texts[0])  # the LRU answers the second router that asks for the same text
    assert embedder.hits == hits + 1


@pytest.mark.parametrize("method", ["knn", "centroid"])
def test_semantic_routes_hand_made_prompts(embedder, method):
    router = _build({"topic": {"type": "semantic", "default": "big", "method": method, "k": 5,
                               "threshold": 0.1, "exemplars_file": str(LABELLED)}})["topic"].router
    for model, prompt in PROMPTS.items():
        d = asyncio.run(router.route(_req(prompt)))
        assert d.model == model, (method, prompt, d)
        assert 0.1 <= d.score <= 1.0 and d.router == "topic"


def test_semantic_threshold_falls_back_to_default(embedder, tmp_path):
    txt = tmp_path / "math.txt"
    txt.write_text("How many apples are left after selling 5 of 12?\nWhat is 15 percent of 80?\n")
    router = _build({"s": {"type": "semantic", "default": "general", "threshold": 0.5, "k": 1,
                           "exemplars": {"math": str(txt), "retail": ["A shop sells mugs for $4 each."]}}})["s"].router
    near = asyncio.run(router.route(_req("How many apples remain after selling 7 of 20?")))
    assert near.model == "math"
    far = asyncio.run(router.route(_req("Translate 'good night' into German.")))
    assert far.model == "general" and "default" in far.reason and far.score < 0.5


def test_semantic_embeds_off_the_event_loop(embedder, monkeypatch):
    """`route` is a coroutine whose embedding runs in a worker thread, so the loop keeps serving meanwhile."""
    import threading

    router = _build({"topic": {"type": "semantic", "default": "big", "exemplars_file": str(LABELLED)}})["topic"].router
    threads: list[int] = []
    embed_one = router.embedder.embed_one

    def recording(text):
        threads.append(threading.get_ident())
        return embed_one(text)

    monkeypatch.setattr(router.embedder, "embed_one", recording)

    async def decide():
        return threading.get_ident(), await router.route(_req(PROMPTS["math"]))

    loop_thread, d = asyncio.run(decide())
    assert d.model == "math" and len(threads) == 1 and threads[0] != loop_thread


def test_classifier_round_trip(classifier_file, embedder):
    bundle = load_classifier(classifier_file)
    assert bundle["embedding_model_id"] == embedder.model_id and bundle["dim"] == 384
    assert set(bundle["labels"]) == {"retail", "math", "general"} and bundle["calibrated"]
    router = _build({"learned": {"type": "classifier", "path": str(classifier_file)}})["learned"].router
    x = embedder.embed(list(PROMPTS.values()))
    direct = bundle["classifier"].predict(x)
    for (model, prompt), expected in zip(PROMPTS.items(), direct, strict=True):
        d = asyncio.run(router.route(_req(prompt)))
        assert d.model == model == expected
        probs = router.probabilities(prompt)
        assert abs(sum(probs.values()) - 1) < 1e-6 and d.score == pytest.approx(probs[model])


def test_single_fit_classifier_uses_one_model_and_its_probabilities(embedder, tmp_path):
    from slm_fusion.routing.classifier import train_classifier

    rows = load_labelled(LABELLED)
    bundle = train_classifier(rows, tmp_path / "fast.pkl", single_fit=True)
    assert bundle["calibrated"] and bundle["single_fit"]
    assert len(bundle["classifier"].calibrated_classifiers_) == 1  # one LR per decision, not the 3-fold ensemble
    ensemble = train_classifier(rows, None)
    assert len(ensemble["classifier"].calibrated_classifiers_) == 3 and not ensemble["single_fit"]
    router = _build({"fast": {"type": "classifier", "path": str(tmp_path / "fast.pkl")}})["fast"].router
    x = embedder.embed(list(PROMPTS.values()))
    for prompt, expected in zip(PROMPTS.values(), bundle["classifier"].predict_proba(x), strict=True):
        probs = router.probabilities(prompt)
        assert [probs[label] for label in bundle["labels"]] == pytest.approx(list(expected), abs=1e-6)


def test_embedding_threads_come_from_the_routing_section(embedder):
    from slm_fusion.routing import embeddings

    try:
        cfg = FusionConfig.model_validate({"models": MODELS, "routing": {"embedding_threads": 2}, "virtual_models": {
            "s": {"router": "semantic", "default": "big", "exemplars_file": str(LABELLED)}}})
        router = build_routers(cfg)["s"].router
        assert router.embedder is not embedder and ("all-minilm-l6-v2", 2) in embeddings._loaded
        if router.embedder.session is not None:
            assert router.embedder.session.get_session_options().intra_op_num_threads == 2
        assert np.allclose(router.embedder.embed(["same vectors?"]), embedder.embed(["same vectors?"]), atol=1e-5)
        with pytest.raises(ValidationError, match="embedding_threads"):  # refused when the config loads
            FusionConfig.model_validate({"models": MODELS, "routing": {"embedding_threads": 0}})
    finally:
        embeddings.set_embedding_threads(1)


def test_classifier_threshold_uses_default(classifier_file):
    router = _build({"c": {"type": "classifier", "path": str(classifier_file), "threshold": 0.999,
                           "default": "big"}})["c"].router
    d = asyncio.run(router.route(_req("hmm")))
    assert d.model == "big" and "default" in d.reason


def test_classifier_from_another_embedding_model_is_refused(classifier_file, tmp_path):
    bundle = joblib.load(classifier_file)
    bundle["embedding_model_id"] = "sentence-transformers/all-mpnet-base-v2"
    bundle["dim"] = 768
    other = tmp_path / "other.pkl"
    joblib.dump(bundle, other)
    with pytest.raises(RoutingConfigError, match="retrain"):
        _build({"c": {"type": "classifier", "path": str(other)}})
    with pytest.raises(RoutingConfigError, match="trained on embedding model 'all-minilm-l6-v2'"):
        _build({"c": {"type": "classifier", "path": str(classifier_file), "embedding": "all-minilm-l6-v2-int8"}})
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(RoutingConfigError, match="not a router classifier"):
        _build({"c": {"type": "classifier", "path": str(tmp_path / "junk.pkl")}})


def test_classifier_labels_must_be_configured_models(classifier_file):
    cfg_models = [m for m in MODELS if m["name"] != "retail"]
    cfg = FusionConfig.model_validate({"models": cfg_models, "routers": {"c": {"type": "classifier",
                                       "path": str(classifier_file)}}})
    with pytest.raises(RoutingConfigError, match="'retail' is not configured"):
        build_routers(cfg)


def test_cascade_consults_classifier_before_generating(classifier_file):
    vm = _build({"learned": {"type": "classifier", "path": str(classifier_file)},
                 "k": {"type": "cascade", "models": ["retail", "big"], "classifier": "learned",
                       "min_probability": 0.5}}, virtual={"k": {"router": "k"}})["k"]
    calls = []

    async def call(model, **kw):
        calls.append(model)
        return [Generation(text="The answer is 3.", finish_reason="stop", prompt_tokens=1, completion_tokens=1)] * (
            kw.get("n") or 1)

    plan = asyncio.run(vm.router.route(_req(PROMPTS["general"])))  # the classifier says: not a retail prompt
    asyncio.run(plan.execute(call))
    assert calls == ["big"] and plan.path == ["big"] and "p(retail)" in plan.reason
    calls.clear()
    plan = asyncio.run(vm.router.route(_req(PROMPTS["retail"])))
    asyncio.run(plan.execute(call))
    assert calls == ["retail"] and plan.path == ["retail"]


def _config(tmp_path: Path, url: str, extra: str) -> Path:
    models = "\n".join(
        f"  - {{name: {n}, backend: openai, model: {n}, base_url: {url}/v1}}" for n in ("retail", "math", "general")
    )
    p = tmp_path / "fusion.yaml"
    p.write_text(f"models:\n{models}\n{extra}")
    return p


def test_check_reports_routing_errors(tmp_path, classifier_file):
    out = classifier_file
    runner = CliRunner()
    good = _config(tmp_path, "http://127.0.0.1:9", f"virtual_models:\n  learned: {{router: classifier, path: {out}}}\n")
    r = runner.invoke(cli_app, ["check", str(good)])
    assert r.exit_code == 0 and "learned" in r.output and "config OK" in r.output, r.output
    missing = _config(tmp_path, "http://127.0.0.1:9", "virtual_models:\n  learned: {router: classifier, path: nope.pkl}\n")
    r = runner.invoke(cli_app, ["check", str(missing)])
    assert r.exit_code == 2 and "router train" in r.output
    empty = _config(tmp_path, "http://127.0.0.1:9",
                    "virtual_models:\n  s: {router: semantic, default: general, exemplars: {math: []}}\n")
    r = runner.invoke(cli_app, ["check", str(empty)])
    assert r.exit_code == 2 and "empty exemplar set" in r.output
