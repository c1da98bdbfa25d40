"""Operations: auth, request size, bounded queue, timeouts, validation errors, graceful shutdown."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from gateway_helpers import serve, serve_gateway, upstream_model

from slm_fusion.app import create_app
from slm_fusion.backends.mock_upstream import ANSWER, MockUpstream
from slm_fusion.config import FusionConfig

MESSAGES = [{"role": "user", "content": "hi"}]
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def upstream():
    with serve(MockUpstream()) as served:
        yield served


@pytest.fixture(scope="module")
def gateway(upstream):
    models = [
        upstream_model("up", upstream.url),
        upstream_model("one-slot", upstream.url, "slow", max_concurrency=1, max_queue=0),
    ]
    server = {"api_keys": [KEY], "max_request_bytes": 4096, "access_log": False, "max_n": 4, "retry_after_s": 2}
    with serve_gateway({"models": models, "server": server}) as served:
        yield served


def post(gateway, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gateway.v1 + "/chat/completions", json=body, headers=headers, timeout=20, **kw)


def assert_openai_error(r, status, type_=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if type_:
        assert err["type"] == type_
    if param:
        assert err["param"] == param
    return err


def test_auth(gateway):
    body = {"model": "up", "messages": MESSAGES}
    assert_openai_error(post(gateway, body, key=None), 401, "authentication_error")
    assert_openai_error(post(gateway, body, key="wrong"), 401, "authentication_error")
    assert post(gateway, body).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.v1, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(gateway.url + "/health").status_code == 200  # unauthenticated by design
    assert httpx.get(gateway.url + "/metrics").status_code == 200


def test_api_keys_from_env(monkeypatch):
    monkeypatch.setenv("FUSION_TEST_KEYS", "k1, k2")
    cfg = FusionConfig.model_validate({"server": {"api_keys_env": "FUSION_TEST_KEYS"}})
    assert cfg.server.resolved_api_keys() == ["k1", "k2"]


def test_request_too_large(gateway):
    body = {"model": "up", "messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_openai_error(post(gateway, body), 413, "invalid_request_error")

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "up", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(gateway.v1 + "/chat/completions", content=chunked(), timeout=20,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_openai_error(r, 413)


def test_unknown_model_404(gateway):
    err = assert_openai_error(post(gateway, {"model": "nope", "messages": MESSAGES}), 404, param="model")
    assert err["code"] == "model_not_found" and "up" in err["message"]
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=gateway.v1, api_key=KEY, max_retries=0).chat.completions.create(
            model="nope", messages=MESSAGES)


def test_validation_errors_name_the_param(gateway):
    assert_openai_error(post(gateway, {"model": "up", "messages": MESSAGES, "temperature": 7}), 422,
                        "invalid_request_error", "temperature")
    assert_openai_error(post(gateway, {"model": "up"}), 422, param="messages")
    assert_openai_error(post(gateway, {"model": "up", "messages": [{"role": "robot", "content": "x"}]}), 422,
                        param="messages.0.role")
    assert_openai_error(post(gateway, {"model": "up", "messages": MESSAGES, "n": 9}), 400, param="n")
    assert_openai_error(post(gateway, {"model": "up", "messages": MESSAGES, "stop": list("abcde")}), 400,
                        param="stop")
    r = httpx.post(gateway.v1 + "/chat/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_openai_error(r, 400, "invalid_request_error")
    assert_openai_error(httpx.get(gateway.url + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}), 404)


def test_reasoning_budget_on_an_upstream_model_caps_what_the_upstream_is_asked_for(gateway, upstream):
    r = post(gateway, {"model": "up", "messages": MESSAGES, "reasoning_budget": 64, "max_tokens": 200})
    assert r.status_code == 200, r.text
    sent = upstream.app.received[-1]
    assert "reasoning_budget" not in sent  # a gateway extra: served here, never forwarded
    asked = sent.get("max_tokens") or sent.get("max_completion_tokens")
    assert asked is not None and 64 <= asked < 200  # the budget (+ the answer's own tokens), below the client's 200
    assert_openai_error(post(gateway, {"model": "up", "messages": MESSAGES, "reasoning_budget": 1}), 400,
                        param="reasoning_budget")  # below the forced answer cue: refused, not silently raised


def test_full_queue_answers_429_with_retry_after(gateway):
    slow = {"model": "one-slot", "messages": MESSAGES, "mock_delay_s": 1.5}
    first: dict = {}
    t = threading.Thread(target=lambda: first.setdefault("r", post(gateway, slow)))
    t.start()
    handle = gateway.app.state.gateway.handles["one-slot"]
    deadline = time.monotonic() + 5
    while handle.admitted == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    r = post(gateway, slow)
    assert_openai_error(r, 429, "rate_limit_error")
    assert r.headers["retry-after"] == "2"
    t.join()
    assert first["r"].status_code == 200
    assert post(gateway, {**slow, "mock_delay_s": 0}).status_code == 200  # the slot was released
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'slm_fusion_requests_total{model="one-slot",route="/v1/chat/completions",status="429"} 1.0' in metrics


def test_graceful_shutdown_lets_in_flight_requests_finish(upstream):
    cfg = FusionConfig.model_validate({"models": [upstream_model("slow", upstream.url, "slow")]})
    result: dict = {}
    with serve(create_app(cfg)) as served:
        body = {"model": "slow", "messages": MESSAGES, "mock_delay_s": 1.0}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(served.v1 + "/chat/completions", json=body, timeout=20)))
        seen = upstream.app.requests
        t.start()
        assert upstream.app.wait_for_requests(seen + 1, timeout=20), "the request never reached the upstream"
        served.server.should_exit = True  # what SIGTERM does
        t.join(timeout=15)
    assert result["r"].status_code == 200
    assert result["r"].json()["choices"][0]["message"]["content"] == ANSWER
