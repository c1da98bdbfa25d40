"""Hand-made malformed request bodies against a real gateway (an upstream model and a local tiny model):
every one is answered with a 4xx in OpenAI's error shape, never a 5xx or a hang."""

from __future__ import annotations

import json

import httpx
import pytest
from gateway_helpers import TINY, serve, serve_gateway, upstream_model

from slm_fusion.backends.mock_upstream import MockUpstream

OK_MSG = [{"role": "user", "content": "hi"}]


def _chat(**fields) -> dict:
    return {"model": "up", "messages": OK_MSG, **fields}


BIG = 2**70
# (path, raw body) — raw bytes where the JSON itself is the point, dicts otherwise (json.dumps, not orjson, so
# integers beyond 64 bits and lone surrogates can be written).
CASES: list[tuple[str, bytes | dict]] = [
    # not JSON / wrong top-level type
    ("chat", b""), ("chat", b"{"), ("chat", b"null"), ("chat", b"[]"), ("chat", b'"text"'), ("chat", b"42"),
    ("chat", b"\xff\xfe\x00"), ("chat", b'{"model": "up", "messages": [}'), ("chat", b"{'model': 'up'}"),
    ("chat", b'{"model": "up", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    # model
    ("chat", {"messages": OK_MSG}), ("chat", _chat(model="")), ("chat", _chat(model=None)), ("chat", _chat(model=3)),
    ("chat", _chat(model=["up"])), ("chat", _chat(model="nope")), ("chat", _chat(model="\ud800")),
    ("chat", _chat(model="x" * 100_000)),
    # messages
    ("chat", {"model": "up"}), ("chat", _chat(messages=[])), ("chat", _chat(messages="hi")),
    ("chat", _chat(messages=[None])), ("chat", _chat(messages=[{}])), ("chat", _chat(messages=[{"role": "robot"}])),
    ("chat", _chat(messages=[{"role": "user", "content": 5}])),
    ("chat", _chat(messages=[{"role": "user", "content": [{"text": "no type"}]}])),
    ("chat", _chat(messages=[{"role": "user", "content": [5]}])),
    ("chat", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}])),
    ("chat", _chat(messages=[{"role": "user", "content": "\ud800"}])),
    ("chat", _chat(messages=[{"role": "user", "content": "a\udfffb"}], model="tiny")),
    ("chat", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                   model="tiny")),
    ("chat", _chat(messages=[{"role": "assistant", "tool_calls": "x"}])),
    ("chat", _chat(messages=[{"role": "tool", "tool_call_id": 5, "content": "x"}])),
    # integers
    ("chat", _chat(max_tokens=BIG)), ("chat", _chat(max_tokens=-1)), ("chat", _chat(max_tokens=0)),
    ("chat", _chat(max_tokens="10")), ("chat", _chat(max_tokens=1.5)), ("chat", _chat(max_completion_tokens=BIG)),
    ("chat", _chat(max_tokens=BIG, model="tiny")), ("chat", _chat(max_tokens=10**12, model="tiny")),
    ("chat", _chat(n=0)), ("chat", _chat(n=BIG)), ("chat", _chat(n=10_000)), ("chat", _chat(seed=BIG)),
    ("chat", _chat(vendor_int=BIG)), ("chat", _chat(logit_bias={"1": BIG})),
    # floats and other scalars
    ("chat", _chat(temperature=-1)), ("chat", _chat(temperature=7)), ("chat", _chat(temperature="hot")),
    ("chat", b'{"model": "up", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("chat", b'{"model": "up", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}'),
    ("chat", b'{"model": "up", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}'),
    ("chat", _chat(top_p=2)), ("chat", _chat(presence_penalty=9)), ("chat", _chat(stream="yes")),
    ("chat", _chat(stream_options="x")),
    # stop
    ("chat", _chat(stop=5)), ("chat", _chat(stop=[""])), ("chat", _chat(stop=["a", "b", "c", "d", "e"])),
    ("chat", _chat(stop=[None])),
    # gateway extras
    ("chat", _chat(reasoning_budget=-1)), ("chat", _chat(reasoning_budget=BIG)), ("chat", _chat(vote="maybe")),
    # local models: what they cannot do
    ("chat", _chat(model="tiny", tools=[{"type": "function", "function": {"name": "f"}}])),
    ("chat", _chat(model="tiny", response_format={"type": "json_schema"})),
    ("chat", _chat(model="tiny", response_format={"type": "yaml"})), ("chat", _chat(model="tiny", response_format=3)),
    ("chat", _chat(model="tiny", messages=[{"role": "user", "content": "x" * 40_000}])),
    # unknown fields with surrogates travel to the upstream: refused before
    ("chat", _chat(user="\udfff")), ("chat", _chat(tools=[{"type": "function", "function": {"name": "\ud800"}}])),
    # completions
    ("completions", {"model": "up"}), ("completions", {"model": "up", "prompt": 5}),
    ("completions", {"model": "up", "prompt": []}), ("completions", {"model": "up", "prompt": ["a", "b"]}),
    ("completions", {"model": "up", "prompt": "x", "suffix": "y"}),
    ("completions", {"model": "up", "prompt": "\ud800"}), ("completions", {"model": "tiny", "prompt": "\ud800"}),
    ("completions", {"model": "up", "prompt": "x", "max_tokens": BIG}),
    ("completions", {"model": "up", "prompt": "x", "echo": [1]}),
    # embeddings
    ("embeddings", {"model": "nope", "input": "x"}), ("embeddings", {"input": "x"}),
    ("embeddings", {"model": "minilm", "input": 5}), ("embeddings", {"model": "minilm", "input": []}),
    ("embeddings", {"model": "minilm", "input": "x", "dimensions": 0}),
    ("embeddings", {"model": "minilm", "input": "x", "encoding_format": "hex"}),
]


@pytest.fixture(scope="module")
def gateway():
    mock = MockUpstream()
    with serve(mock) as up:
        config = {"models": [upstream_model("up", up.url), {**TINY, "max_output_tokens": 64}],
                  "embeddings": {"name": "minilm"}, "server": {"access_log": False, "max_request_bytes": 200_000}}
        with serve_gateway(config) as served:
            yield served


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60


def test_malformed_bodies_never_get_a_5xx(gateway):
    failures = []
    with httpx.Client(base_url=gateway.v1, timeout=30) as http:
        for path, body in CASES:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(f"/{path}", content=content, headers={"content-type": "application/json"})
            try:
                err = r.json()["error"]
                shaped = isinstance(err["message"], str) and isinstance(err["type"], str)
            except Exception:  # noqa: BLE001 — any non-OpenAI body is a failure, reported below
                shaped = False
            if not 400 <= r.status_code < 500 or not shaped:
                failures.append((path, content[:120], r.status_code, r.text[:200]))
    assert not failures, "\n".join(map(str, failures))
