"""The official `openai` client against a real uvicorn serving `tiny-random-llama` through the gateway.

Outputs of a random model are gibberish: these tests check structure, token accounting, limits, stop sequences,
determinism and batching, not content.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from gateway_helpers import TINY, gateway_of, serve_gateway

from reasonlite.models import load_tokenizer

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def gateway():
    import torch

    torch.set_num_threads(1)
    with serve_gateway({"models": [TINY], "server": {"access_log": False}}) as served:
        yield served


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random-llama")


def test_chat_completion_structure_and_usage(client, tokenizer):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0.8, seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected_prompt = len(ids["input_ids"])
    assert r.usage.prompt_tokens == expected_prompt
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint == "fusion-transformers"


def test_max_tokens_respected(client, tokenizer):
    for limit in (1, 7):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=limit, temperature=1.0, seed=3)
        assert r.usage.completion_tokens <= limit
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == limit
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4


def test_determinism_greedy_and_seeded(client):
    greedy = [client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
              .choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=42)
              .choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    other = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=43)
    assert other.choices[0].message.content != seeded[0]


def test_n_choices(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=5, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # each choice samples with its own generator
    assert r.usage.completion_tokens <= 18


def test_stop_sequence_honoured(client):
    base = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=1.0, seed=11)
    text = base.choices[0].message.content
    assert len(text) > 10
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text.find(stop)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=1.0, seed=11,
                                       stop=[stop, "never-appears-zz"])
    assert r.choices[0].message.content == text[:cut]
    assert r.choices[0].finish_reason == "stop"


def test_streaming_matches_non_streaming(client):
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 15, "temperature": 1.0, "seed": 9}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_streaming_wire_format(gateway):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "stream": True, "n": 2}
    with httpx.stream("POST", gateway.v1 + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    assert '"role":"assistant"' in frames[0] and '"role":"assistant"' in frames[1]  # one per choice
    assert sum('"finish_reason":"' in f for f in frames) == 2


def test_async_client_concurrent_requests_are_batched(gateway):
    backend = gateway_of(gateway).handles["tiny"].backends[0]
    before = backend.batches_run

    async def main():
        aclient = openai.AsyncOpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
        return await asyncio.gather(*[
            aclient.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q{i}"}],
                                            max_tokens=8, temperature=0)
            for i in range(4)
        ])

    results = asyncio.run(main())
    assert all(r.choices[0].message.content is not None for r in results)
    assert backend.batches_run - before < 4  # at least two requests shared a decode batch


def test_batched_greedy_equals_alone(gateway, client):
    alone = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)

    async def main():
        aclient = openai.AsyncOpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
        return await asyncio.gather(
            aclient.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0),
            aclient.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a longer prompt"}],
                                            max_tokens=3, temperature=0),
        )

    together, _ = asyncio.run(main())
    assert together.choices[0].message.content == alone.choices[0].message.content


def test_text_completions(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5
    echoed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_models_endpoints(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_client_disconnect_mid_stream_releases_the_slot(gateway):
    handle = gateway_of(gateway).handles["tiny"]
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 64, "stream": True, "temperature": 0}
    with httpx.stream("POST", gateway.v1 + "/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines), next(lines)  # leave after the first frames
    deadline = time.monotonic() + 10
    while handle.admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.admitted == 0


def test_metrics_and_request_id(gateway, client):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    r = httpx.get(gateway.url + "/health", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["models"]["tiny"]["state"] == "ready"
    assert len(httpx.get(gateway.url + "/health").headers["x-request-id"]) == 32  # generated when absent
    text = httpx.get(gateway.url + "/metrics").text
    assert 'slm_fusion_requests_total{model="tiny",route="/v1/chat/completions",status="200"}' in text
    assert 'slm_fusion_tokens_total{kind="completion",model="tiny"}' in text
    assert "slm_fusion_time_to_first_token_seconds_count" in text
    assert 'slm_fusion_queue_depth{model="tiny"} 0.0' in text
