"""Routing through the real gateway: the official `openai` client → uvicorn gateway → uvicorn scripted upstream.

Cascade escalation, fallbacks (500, timeout, streaming before the first byte), replica cooldown, headers, metrics.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from gateway_helpers import serve, upstream_model
from routing_upstream import make_upstream

from slm_fusion.app import create_app
from slm_fusion.backends.openai_upstream import OpenAIBackend
from slm_fusion.config import FusionConfig, OpenAIModel


@pytest.fixture(scope="module")
def upstream():
    app, hits = make_upstream()
    with serve(app) as served:
        served.hits = hits
        yield served


@pytest.fixture(scope="module")
def gateway(upstream):
    u = upstream.url
    models = [
        upstream_model("small", u, "small"),
        upstream_model("big", u, "answer-42"),
        upstream_model("broken", u, "fail-500"),
        upstream_model("broken-stream", u, "fail-500"),
        upstream_model("slowpoke", u, "slow", timeout_s=0.5),
        upstream_model("pair", u, "answer-5", replicas=2),
    ]
    config = FusionConfig.model_validate({
        "models": models,
        "server": {"access_log": False},
        "routing": {"allowed_fails": 1, "cooldown_s": 1.0,
                    "fallbacks": {"broken": ["big"], "broken-stream": ["big"], "slowpoke": ["big"]}},
        "routers": {"tiers": {"type": "rules", "default": "small",
                              "rules": [{"model": "big", "header": {"x-tier": "premium"}}]}},
        "virtual_models": {
            "by-tier": {"router": "tiers"},
            "cascade": {"router": "cascade", "models": ["small", "big"], "threshold": 0.6, "samples": 3},
            "auto": {"router": "semantic", "default": "small", "threshold": 0.3, "k": 1,
                     "exemplars": {"big": ["Write a poem about the sea.", "Compose a short story about a dragon."],
                                   "small": ["How many apples are left?", "What is 12 times 7?"]}},
            "shaky": {"router": "rules", "default": "broken"},
        },
    })
    # Two deployments of `pair`: the first always fails, the second answers (to watch cooldowns).
    pair = [OpenAIBackend(OpenAIModel(name="pair", backend="openai", model=m, base_url=u + "/v1"))
            for m in ("fail-500", "answer-5")]
    with serve(create_app(config, backends={"pair": pair})) as served:
        yield served


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=30)


def _ask(client, model, text, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kw)
    return raw.parse(), raw.headers


def test_explicit_model_bypasses_routing(client):
    r, h = _ask(client, "small", "hello")
    assert h["x-slm-fusion-model"] == "small" and "x-slm-fusion-route" not in h
    assert r.model == "small"


def test_rules_on_header_and_route_headers(client):
    r, h = _ask(client, "by-tier", "hello", extra_headers={"X-Tier": "premium"})
    assert h["x-slm-fusion-model"] == "big" and r.choices[0].message.content == "The answer is 42."
    assert h["x-slm-fusion-route"].startswith("tiers;score=1.000;reason=rule #0: header x-tier")
    r, h = _ask(client, "by-tier", "hello")
    assert h["x-slm-fusion-model"] == "small" and "default" in h["x-slm-fusion-route"]
    assert r.model == "by-tier"  # the response names the model the client asked for


def test_semantic_virtual_model(client):
    _, h = _ask(client, "auto", "Please write a poem about mountains at dawn.")
    assert h["x-slm-fusion-model"] == "big" and h["x-slm-fusion-route"].startswith("auto;")
    _, h = _ask(client, "auto", "How many oranges are left if I eat 3 of 10?")
    assert h["x-slm-fusion-model"] == "small"


def test_cascade_stays_small_when_confident(client, upstream):
    before = dict(upstream.hits)
    r, h = _ask(client, "cascade", "How many apples?")
    assert h["x-slm-fusion-model"] == "small" and r.choices[0].message.content.endswith("The answer is 7.")
    assert "path=" not in h["x-slm-fusion-route"] and "confident: agreement 1.00" in h["x-slm-fusion-route"]
    assert r.model_extra["slm_fusion"]["agreement"] == 1.0
    assert upstream.hits["small"] == before.get("small", 0) + 1 and upstream.hits["answer-42"] == before.get(
        "answer-42", 0)


@pytest.mark.parametrize(("tag", "reason"), [("[unsure]", "reason=agreement 0.33<0.6"),
                                             ("[pal-broken]", "reason=exec_error runtime")])
def test_cascade_escalates_on_low_confidence(client, upstream, tag, reason):
    before = upstream.hits["answer-42"]
    r, h = _ask(client, "cascade", f"How many apples? {tag}")
    assert h["x-slm-fusion-model"] == "big" and r.choices[0].message.content == "The answer is 42."
    route = h["x-slm-fusion-route"]
    assert route.startswith("cascade;path=small>big;") and reason in route
    assert upstream.hits["answer-42"] == before + 1


def test_cascade_keeps_working_pal_program(client):
    r, h = _ask(client, "cascade", "Compute it. [pal-ok]")
    assert h["x-slm-fusion-model"] == "small" and "def solution" in r.choices[0].message.content
    assert r.model_extra["slm_fusion"]["answer"] == "42"


def test_fallback_after_500_and_timeout(client):
    r, h = _ask(client, "broken", "hi")
    assert h["x-slm-fusion-model"] == "big" and r.choices[0].message.content == "The answer is 42."
    assert h["x-slm-fusion-route"].startswith("fallback;path=broken>big;")
    assert "UpstreamError" in h["x-slm-fusion-route"]
    t0 = time.monotonic()
    r, h = _ask(client, "slowpoke", "hi")
    assert h["x-slm-fusion-model"] == "big" and "GatewayTimeout" in h["x-slm-fusion-route"]
    assert time.monotonic() - t0 < 1.8  # gave up on the slow model after its 0.5 s timeout
    # A routed request keeps its router in the header and adds the fallback.
    _, h = _ask(client, "shaky", "hi")
    assert h["x-slm-fusion-model"] == "big" and h["x-slm-fusion-route"].startswith("shaky;path=broken>big;")
    assert "broken: cooling down" in h["x-slm-fusion-route"]  # benched after its failure above (allowed_fails=1)


def test_stream_falls_back_before_first_byte(client, upstream):
    failed = upstream.hits["fail-500"]
    with client.chat.completions.with_streaming_response.create(
        model="broken-stream", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as resp:
        assert resp.headers["x-slm-fusion-model"] == "big"
        assert "UpstreamError" in resp.headers["x-slm-fusion-route"]  # really tried, failed, then fell back
        assert upstream.hits["fail-500"] == failed + 1
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text == "The answer is 42."


def test_replica_cooldown_then_recovery(client, gateway, upstream):
    health = gateway.app.state.gateway.handles["pair"].health
    now = [time.monotonic()]
    health.clock = lambda: now[0]  # the deployment's own clock, moved by the test instead of slept through
    try:
        failed = upstream.hits["fail-500"]
        r, h = _ask(client, "pair", "hi")  # replica 0 fails, replica 1 answers; replica 0 cools down for 1 s
        assert r.choices[0].message.content == "The answer is 5." and "path=pair>pair" in h["x-slm-fusion-route"]
        assert upstream.hits["fail-500"] == failed + 1
        now[0] += 0.9
        for _ in range(3):  # while it cools, every request goes straight to the healthy replica
            r, h = _ask(client, "pair", "hi")
            assert r.choices[0].message.content == "The answer is 5." and "x-slm-fusion-route" not in h
        assert upstream.hits["fail-500"] == failed + 1
        now[0] += 0.2  # cooldown over: the failing replica is tried again
        _ask(client, "pair", "hi")
        assert upstream.hits["fail-500"] == failed + 2
    finally:
        health.clock = time.monotonic


def test_unknown_virtual_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        _ask(client, "no-such-router", "hi")
    assert "by-tier" in str(e.value) and "cascade" in str(e.value)


def test_route_label_in_metrics(client, gateway):
    _ask(client, "by-tier", "hi", extra_headers={"x-tier": "premium"})
    text = httpx.get(gateway.url + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("slm_fusion_routed_requests_total{")
                and 'virtual_model="by-tier"' in ln and 'model="big"' in ln)
    assert 'router="tiers"' in line and float(line.rsplit(" ", 1)[1]) >= 1
