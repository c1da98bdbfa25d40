"""Output fusion (`virtual_models: {x: {fusion: vote, models: [...]}}`) through the official `openai` client."""

from __future__ import annotations

import openai
import pytest
from gateway_helpers import serve, serve_gateway, upstream_model
from routing_upstream import make_upstream


@pytest.fixture(scope="module")
def upstream():
    app, hits = make_upstream()
    with serve(app) as served:
        served.hits = hits
        yield served


@pytest.fixture(scope="module")
def client(upstream):
    u = upstream.url
    config = {
        "models": [upstream_model("a7", u, "answer-7"), upstream_model("a42", u, "answer-42"),
                   upstream_model("b42", u, "answer-42"), upstream_model("echo", u, "echo"),
                   upstream_model("broken", u, "fail-500")],
        "server": {"access_log": False},
        "routers": {"voted": {"type": "fusion", "fusion": "vote", "models": ["a7", "a42", "b42"]}},
        "virtual_models": {
            "registered": {"router": "voted"},  # output fusion built by the router registry like any router
            "ensemble": {"fusion": "vote", "models": ["a7", "a42", "b42"]},
            "first": {"fusion": "first_valid", "models": ["echo", "a7", "a42"]},
            "degraded": {"fusion": "vote", "models": ["broken", "a42", "b42"]},
        },
    }
    with serve_gateway(config) as gw:
        yield openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=30)


def _ask(client, model, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "What is 6 times 7?"}], **kw)
    return raw.parse(), raw.headers


def test_majority_vote_returns_winner_and_agreement(client, upstream):
    before = {m: upstream.hits[m] for m in ("answer-7", "answer-42")}
    r, h = _ask(client, "ensemble")
    assert r.choices[0].message.content == "The answer is 42."
    fused = r.model_extra["slm_fusion"]
    assert fused["agreement"] == pytest.approx(2 / 3) and fused["votes"] == {"42": 2, "7": 1}
    assert fused["answers"] == {"a7": "7", "a42": "42", "b42": "42"} and fused["chosen"] == "a42"
    assert h["x-slm-fusion-agreement"] == "0.667" and h["x-slm-fusion-model"] == "a42"
    assert h["x-slm-fusion-route"].startswith("ensemble;path=a7>a42>b42;score=0.667")
    # every specialist was asked exactly once
    assert upstream.hits["answer-7"] == before["answer-7"] + 1 and upstream.hits["answer-42"] == before["answer-42"] + 2


def test_fusion_is_a_registered_router_kind(client):
    """`type: fusion` in `routers:` is built by `build_router` and answers exactly as the short form does."""
    from slm_fusion.routing import ROUTERS
    from slm_fusion.routing.fusion import OutputFusion

    assert ROUTERS["fusion"] is OutputFusion
    r, h = _ask(client, "registered")
    assert r.choices[0].message.content == "The answer is 42."
    assert r.model_extra["slm_fusion"]["votes"] == {"42": 2, "7": 1} and h["x-slm-fusion-agreement"] == "0.667"
    assert h["x-slm-fusion-route"].startswith("voted;path=a7>a42>b42")


def test_first_valid_skips_completions_without_answer(client):
    r, h = _ask(client, "first")
    assert r.choices[0].message.content == "The answer is 7."
    assert r.model_extra["slm_fusion"]["chosen"] == "a7" and h["x-slm-fusion-model"] == "a7"
    assert r.model_extra["slm_fusion"]["answers"]["echo"] is None


def test_failed_specialist_counts_against_agreement(client):
    r, _ = _ask(client, "degraded")
    fused = r.model_extra["slm_fusion"]
    assert r.choices[0].message.content == "The answer is 42."
    assert fused["agreement"] == pytest.approx(2 / 3) and "broken" in fused["failed"]


def test_fusion_streams_the_fused_answer(client):
    stream = client.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "6*7?"}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "The answer is 42."
