"""Issue 16: the gateway as a faithful OpenAI drop-in over an OpenAI-compatible upstream.

Official `openai` client → uvicorn gateway on 127.0.0.1 → recording mock upstream: what the client sends arrives
unchanged (no injected defaults, unknown fields, tools and tool-call history kept), `tool_calls` and `logprobs`
come back unchanged (json and stream), and the failure paths (429, wrong-shape chunks, cut connections, client
disconnects) neither leak internals nor duplicate work.
"""

from __future__ import annotations

import asyncio
import json
import time
import typing

import httpx
import openai
import orjson
import pydantic
import pytest
from gateway_helpers import TINY, free_port, serve_gateway, upstream_model

from slm_fusion.backends.mock_upstream import TOOL_CALL

MESSAGES = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"], "additionalProperties": False}, "strict": True}}]
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "name": "alice", "content": [
        {"type": "text", "text": "What is in this image, and the weather in Paris?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "call_mock1", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module", params=["aiohttp", "httpx"])
def gateway(upstream, request):
    t = {"transport": request.param}
    u = upstream.url
    models = [
        upstream_model("up", u, **t),
        upstream_model("up-tools", u, "tools", **t),
        upstream_model("up-429", u, "rate-429", **t),
        upstream_model("up-bad", u, "bad-shape", **t),
        upstream_model("up-cut", u, "cut", **t),
        upstream_model("up-leak", u, "leak", **t),
        upstream_model("up-slow", u, "slow", timeout_s=0.6, **t),
        upstream_model("up-capped", u, default_max_tokens=99, **t),
        upstream_model("up-dead", f"http://127.0.0.1:{free_port()}", **t),
    ]
    config = {
        "models": models, "server": {"access_log": False},
        "embeddings": {"name": "minilm"},
        "routing": {"fallbacks": {"up-slow": ["up"]}},
        "virtual_models": {"careful": {"router": "cascade", "models": ["up", "up-tools"], "samples": 2}},
    }
    with serve_gateway(config) as served:
        yield served


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=20)


def _last(upstream) -> dict:
    return upstream.mock.received[-1]


def _post(gateway, body: dict | bytes, path: str = "/chat/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gateway.v1 + path, content=content, headers={"content-type": "application/json"}, timeout=20)


# ------------------------------------------------------------------------------------------ request fidelity


def test_nothing_is_added_to_a_minimal_request(client, upstream):
    client.chat.completions.create(model="up", messages=MESSAGES)
    assert _last(upstream) == {"model": "mock", "messages": MESSAGES}
    list(client.chat.completions.create(model="up", messages=MESSAGES, stream=True))
    assert _last(upstream) == {"model": "mock", "messages": MESSAGES, "stream": True}
    client.completions.create(model="up", prompt="x")
    assert _last(upstream) == {"model": "mock", "prompt": "x"}



def test_numbers_arrive_as_written(gateway, upstream):
    _post(gateway, b'{"model": "up", "messages": [{"role": "user", "content": "hi"}], "temperature": 1, "top_p": 1}')
    sent = _last(upstream)
    assert type(sent["temperature"]) is int and type(sent["top_p"]) is int  # not re-typed to 1.0


def test_every_field_the_client_sent_arrives_unchanged(client, upstream):
    sent = {
        "messages": HISTORY, "tools": TOOLS, "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_completion_tokens": 50, "temperature": 0.3, "top_p": 0.9, "n": 1, "stop": ["\n\n"], "seed": 7,
        "presence_penalty": 0.1, "frequency_penalty": 0.2, "logit_bias": {"42": -5}, "user": "u-1",
        "logprobs": True, "top_logprobs": 2, "metadata": {"k": "v"}, "store": False,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "w", "strict": True, "schema": {"type": "object", "properties": {"t": {"type": "number"}}}}},
    }
    client.chat.completions.create(model="up", extra_body={"vendor_flag": {"deep": [1, 2]}}, **sent)
    assert _last(upstream) == {"model": "mock", **sent, "vendor_flag": {"deep": [1, 2]}}
    stream = client.chat.completions.create(model="up", stream=True, stream_options={"include_usage": True}, **sent)
    list(stream)
    assert _last(upstream) == {"model": "mock", **sent, "stream": True, "stream_options": {"include_usage": True}}


def test_gateway_extras_are_not_forwarded_and_a_configured_cap_is(client, upstream):
    client.chat.completions.create(model="up-capped", messages=MESSAGES)
    assert _last(upstream) == {"model": "mock", "messages": MESSAGES, "max_tokens": 99}
    client.chat.completions.create(model="up-capped", messages=MESSAGES, max_completion_tokens=5)
    assert _last(upstream) == {"model": "mock", "messages": MESSAGES, "max_completion_tokens": 5}
    cards = {c.id: c.model_extra for c in client.models.list().data}
    assert cards["up-capped"]["default_max_tokens"] == 99 and cards["up"]["default_max_tokens"] is None


# ----------------------------------------------------------------------------------------- response fidelity


def test_tool_calls_come_back(client, upstream):
    r = client.chat.completions.create(model="up-tools", messages=MESSAGES, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.model_dump() for c in choice.message.tool_calls] == [TOOL_CALL]
    assert _last(upstream)["tools"] == TOOLS


def test_streamed_tool_call_fragments_come_back(client):
    chunks = list(client.chat.completions.create(model="up-tools", messages=MESSAGES, tools=TOOLS, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
    assert calls[0].id == TOOL_CALL["id"] and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert "".join(tc.function.arguments or "" for tc in calls) == TOOL_CALL["function"]["arguments"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_logprobs_come_back_unchanged(client):
    r = client.chat.completions.create(model="up", messages=MESSAGES, logprobs=True, top_logprobs=0)
    tokens = [t.token for t in r.choices[0].logprobs.content]
    assert "".join(tokens) == r.choices[0].message.content and r.choices[0].logprobs.content[0].logprob == -0.5
    chunks = list(client.chat.completions.create(model="up", messages=MESSAGES, logprobs=True, stream=True))
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == tokens
    text = client.completions.create(model="up", prompt="x", logprobs=1)
    assert text.choices[0].logprobs is not None


# ------------------------------------------------------------------------------------------------ reliability


def test_upstream_429_keeps_its_retry_after(gateway):
    r = _post(gateway, {"model": "up-429", "messages": MESSAGES})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    err = r.json()["error"]
    assert err["code"] == "upstream_rate_limited" and "upstream" in err["message"] and "slow down" in err["message"]


def test_wrong_shape_upstream_json_is_a_502_and_a_stream_ends_with_an_error_frame(gateway):
    r = _post(gateway, {"model": "up-bad", "messages": MESSAGES})
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    r = _post(gateway, {"model": "up-bad", "messages": MESSAGES, "stream": True})
    frames = [f.removeprefix("data: ") for f in r.text.split("\n\n") if f]
    assert r.status_code == 200 and frames[-1] == "[DONE]"
    assert "not an OpenAI chunk" in orjson.loads(frames[-2])["error"]["message"]


def test_a_request_that_reached_the_upstream_is_never_sent_twice(gateway, upstream):
    seen = upstream.mock.requests
    r = _post(gateway, {"model": "up-cut", "messages": MESSAGES})
    assert r.status_code == 502
    assert upstream.mock.requests == seen + 1


def test_client_errors_never_show_upstream_urls(gateway, upstream):
    port = upstream.url.rsplit(":", 1)[1]
    for model in ("up-leak", "up-dead"):
        r = _post(gateway, {"model": model, "messages": MESSAGES})
        assert r.status_code == 502, r.text
        assert "127.0.0.1" not in r.text and port not in r.text and "http://" not in r.text, r.text


def test_integer_and_unicode_edge_cases_are_400(gateway):
    for body in ({"model": "up", "messages": MESSAGES, "max_tokens": 2**70},
                 {"model": "up", "messages": MESSAGES, "max_completion_tokens": 2**64},
                 {"model": "up", "messages": MESSAGES, "vendor_int": 2**70}):
        r = _post(gateway, json.dumps(body).encode())  # orjson itself refuses integers beyond 64 bits
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    for raw in (b'{"model": "up", "messages": [{"role": "user", "content": "\\ud800"}]}',
                b'{"model": "up", "messages": [{"role": "user", "content": "hi"}], "user": "\\udfff"}',
                b'{"model": "up\\ud800", "messages": [{"role": "user", "content": "hi"}]}'):
        r = _post(gateway, raw)
        assert 400 <= r.status_code < 500 and "error" in r.json(), r.text


def test_n_on_a_routing_plan_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="careful", messages=MESSAGES, n=2)
    assert e.value.body["param"] == "n"


def test_embedding_model_on_chat_says_what_it_is(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minilm", messages=MESSAGES)
    assert "embedding model" in e.value.body["message"] and "/v1/embeddings" in e.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_upstream_call_and_no_fallback_runs(gateway, upstream, stream):
    """`up-slow` times out after 0.6 s and then falls back to `up`: a client that left at 0.3 s must not set that
    off, and its slot is free at once."""
    body = {"model": "up-slow", "messages": MESSAGES, "mock_delay_s": 1.5, "stream": stream}

    async def leave_early() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(0.3)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(gateway.v1 + "/chat/completions", json=body)

    seen = upstream.mock.requests
    asyncio.run(leave_early())
    health = gateway.app.state.gateway.handles["up-slow"]
    deadline = time.monotonic() + 0.25
    while health.admitted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health.admitted == 0  # the slot was freed at once, not at the 0.6 s timeout
    # Wait for the request's handler to end (uvicorn tracks one task per request cycle): a handler that kept running
    # would reach the 0.6 s timeout and start the fallback to `up` before ending, so once none is left, none can.
    pending = list(gateway.server.server_state.tasks)
    if pending:  # awaited on the server's own event loop
        asyncio.run_coroutine_threadsafe(asyncio.wait(pending), pending[0].get_loop()).result(timeout=10)
    assert all(t.done() for t in pending)
    assert upstream.mock.requests == seen + 1


# --------------------------------------------------------------------------------------------- local models


@pytest.fixture(scope="module")
def local():
    tiny = {**TINY, "max_batch_size": 1, "batch_wait_ms": 0, "max_concurrency": 1, "max_output_tokens": 4000}
    with serve_gateway({"models": [tiny], "server": {"access_log": False}}) as served:
        yield served


def test_local_model_refuses_what_it_cannot_do(local):
    # (tools themselves are served locally now: tests/test_gateway_tools.py; a malformed one is still a 400)
    for fields, param in (({"tools": [{"type": "function", "function": {}}]}, "tools"),
                          ({"messages": HISTORY[:2]}, "messages"),
                          ({"response_format": {"type": "json_schema"}}, "response_format"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                              "type": "frobnicate"}}}}, "response_format"),
                          ({"response_format": {"type": "xml"}}, "response_format")):
        r = _post(local, {"model": "tiny", "messages": MESSAGES, **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


class Pick(pydantic.BaseModel):
    ok: bool
    pick: typing.Literal["yes", "no"]
    count: int = pydantic.Field(ge=0, le=9)


def test_local_model_enforces_response_format(local):
    """A random model writes valid JSON only if the schema is enforced while decoding: parsed by the official SDK."""
    client = openai.OpenAI(base_url=local.v1, api_key="unused", max_retries=0, timeout=60)
    for temperature in (0, 1):
        done = client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Pick, max_tokens=64,
                                             temperature=temperature, seed=3)
        choice = done.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pick), choice.message.content
        assert 0 < done.usage.completion_tokens <= 64  # ended by the grammar, not by max_tokens
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                       max_tokens=200, temperature=1, seed=1)
    if r.choices[0].finish_reason == "stop":  # an open object may run past max_tokens; a finished one is JSON
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=64, stream=True,
                                            response_format={"type": "json_schema", "json_schema": {
                                                "name": "pick", "schema": {**Pick.model_json_schema(), "additionalProperties": False}}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert Pick.model_validate_json(text)


def test_client_disconnect_frees_the_local_slot(local):
    """One slot, one batch row: a dropped 4,000-token request must not hold up the next one. Measured by the
    next request's own latency: it waits in the queue only if the dropped generation still runs."""
    long = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4000, "temperature": 0}

    async def leave_early() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(0.5)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(local.v1 + "/chat/completions", json=long)

    asyncio.run(leave_early())
    start = time.monotonic()
    r = _post(local, {"model": "tiny", "messages": MESSAGES, "max_tokens": 1})
    assert r.status_code == 200
    assert time.monotonic() - start < 1.0


def test_local_text_completions_return_logprobs_in_their_own_shape(local):
    """transformers backend, /v1/completions `logprobs: N`: OpenAI's legacy shape (tokens, token_logprobs, top_logprobs,
    text_offset), one entry per generated token, greedy = the top one, the stream carrying the same entries."""
    client = openai.OpenAI(base_url=local.v1, api_key="unused", max_retries=0, timeout=60)
    r = client.completions.create(model="tiny", prompt="one two three", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and logprob <= 0 and max(top.values()) == logprob  # greedy took the top token
    stream = client.completions.create(model="tiny", prompt="one two three", max_tokens=6, temperature=0, logprobs=2,
                                       stream=True)
    streamed = [(t, v) for c in stream if c.choices and c.choices[0].logprobs
                for t, v in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs, strict=True)]
    assert streamed == list(zip(lp.tokens, lp.token_logprobs, strict=True))
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).choices[0].logprobs is None


def test_local_model_returns_logprobs_of_what_it_generated(local):
    """transformers backend: one entry per generated token, the greedy token is the most likely one, and the stream
    carries the same entries as the whole answer."""
    client = openai.OpenAI(base_url=local.v1, api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the top token was taken
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    streamed = [e for c in client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None  # only when asked
    for body, param in (({"prompt": "x", "logprobs": 6}, "logprobs"),
                        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 99}, "top_logprobs")):
        bad = _post(local, {"model": "tiny", **body}, "/completions" if "prompt" in body else "/chat/completions")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
