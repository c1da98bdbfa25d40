"""The `openai` backend against a second local server (the mock upstream): pass-through and every failure path."""

from __future__ import annotations

import time

import httpx
import openai
import orjson
import pytest
from gateway_helpers import free_port, serve_gateway, upstream_model

from slm_fusion.backends.mock_upstream import ANSWER

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=["aiohttp", "httpx"])
def gateway(upstream, request):
    """Every test runs over both connection layers of the httpx client (httpx-aiohttp and httpcore)."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = {"transport": request.param}
    models = [
        upstream_model("up", upstream.url, **t),
        upstream_model("up-500", upstream.url, "fail-500", **t),
        upstream_model("up-reset", upstream.url, "reset", **t),
        upstream_model("up-slow", upstream.url, "slow", timeout_s=0.5, **t),
        upstream_model("up-dead", dead, **t),
    ]
    with serve_gateway({"models": models, "server": {"access_log": False}}) as served:
        yield served


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=20)


def test_chat_and_stream_pass_through(client, upstream):
    seen = upstream.mock.requests
    r = client.chat.completions.create(model="up", messages=MESSAGES, n=2, extra_body={"custom_flag": 1})
    assert [c.message.content for c in r.choices] == [ANSWER, ANSWER]
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 2 * len(ANSWER.split(" "))
    assert upstream.mock.requests == seen + 1
    chunks = list(client.chat.completions.create(model="up", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].usage.prompt_tokens == 7


def test_text_completion_pass_through(client):
    r = client.completions.create(model="up", prompt="x", max_tokens=5)
    assert r.choices[0].text == ANSWER


def test_upstream_500_becomes_502(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="up-500", messages=MESSAGES)
    assert e.value.status_code == 502
    assert e.value.body["type"] == "upstream_error" and "exploded" in e.value.body["message"]


def test_unreachable_upstream_becomes_502(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="up-dead", messages=MESSAGES)
    assert e.value.status_code == 502


def test_upstream_timeout_becomes_504(client):
    for stream in (False, True):
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="up-slow", messages=MESSAGES, stream=stream,
                                           extra_body={"mock_delay_s": 3})
        assert e.value.status_code == 504
        assert time.monotonic() - start < 2.5


def test_connection_reset_mid_stream_sends_error_frame_then_done(gateway):
    body = {"model": "up-reset", "messages": MESSAGES, "stream": True}
    start = time.monotonic()
    r = httpx.post(gateway.v1 + "/chat/completions", json=body, timeout=10)
    assert time.monotonic() - start < 5  # no hang
    assert r.status_code == 200  # the stream had started: the failure is reported in-band
    frames = [f.removeprefix("data: ") for f in r.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    error = orjson.loads(frames[-2])["error"]
    assert error["type"] == "upstream_error"
    contents = [orjson.loads(f)["choices"][0]["delta"].get("content") for f in frames[:-2]]
    assert contents == ["", "Hello ", "from "]  # what arrived before the reset was passed on


def test_connection_reset_surfaces_in_the_openai_client(client):
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="up-reset", messages=MESSAGES, stream=True))


def test_gateway_still_healthy_after_failures(gateway, client):
    r = client.chat.completions.create(model="up", messages=MESSAGES)
    assert r.choices[0].message.content == ANSWER
    health = httpx.get(gateway.url + "/health").json()
    assert all(m["in_flight"] == 0 and m["queued"] == 0 for m in health["models"].values())
