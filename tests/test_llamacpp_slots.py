"""Parallel slots on the llama.cpp backend (SmolLM2 GGUF, greedy): several requests in one context.

Greedy text is compared with llama-cpp-python's own `create_completion` on a context reset before each prompt, so a
wrong position, sequence id or cell copy shows up as a different text.
"""

from __future__ import annotations

import asyncio

import pytest

from reasonlite.models import smollm2_gguf
from slm_fusion.backends.base import GenerationRequest
from slm_fusion.config import LlamaCppModel

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.integration

from slm_fusion.backends.llamacpp import LlamaCppBackend

SYSTEM = {"role": "system", "content": "You help in a hardware shop. " + ", ".join(
    f"item {i} costs {3 * i + 1} dollars" for i in range(20))}
STORIES = [[{"role": "user", "content": f"Write a short story about {x}."}]
           for x in ("a cat", "a dog", "a lamp", "a key", "a bird", "a tree")]


@pytest.fixture(scope="module")
def raw():
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf()), n_ctx=2048, n_threads=2, verbose=False)
    yield llm
    llm.close()


def started(loop, **kw) -> LlamaCppBackend:
    b = LlamaCppBackend(LlamaCppModel.model_validate(
        {"name": "smol", "backend": "llamacpp", "model": str(smollm2_gguf()), "n_threads": 2, **kw}))
    loop.run_until_complete(b.start())
    return b


@pytest.fixture(scope="module")
def slots(loop):
    b = started(loop, slots=4, prefix_cache=False)
    yield b
    loop.run_until_complete(b.aclose())


def alone(raw, backend, messages, max_tokens: int, **kw) -> str:
    raw.reset()  # no prefix kept from the previous prompt: computed whole, like the backend with prefix_cache off
    return raw.create_completion(prompt=backend.format_chat(messages), max_tokens=max_tokens, temperature=0,
                                 **kw)["choices"][0]["text"]


def gen(messages, max_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=kw.pop("temperature", 0), **kw)


def test_concurrent_requests_share_decode_steps_and_each_equals_its_request_alone(loop, slots, raw):
    steps = slots.steps_run

    async def main():
        return await asyncio.gather(*(slots.generate(gen(m, 24)) for m in STORIES))

    outs = loop.run_until_complete(main())
    tokens = sum(o[0].completion_tokens for o in outs)
    assert slots.steps_run - steps < tokens * 0.6  # six requests in four slots: several tokens per llama_decode
    assert [o[0].text for o in outs] == [alone(raw, slots, m, 24) for m in STORIES]


def test_a_short_request_joins_a_long_one_and_finishes_first(loop, slots, raw):
    async def main():
        chunks = slots.stream(gen(STORIES[0], 200))
        texts = [(await anext(chunks)).text]  # the long request is decoding
        done = asyncio.Event()

        async def rest():
            async for c in chunks:
                texts.append(c.text)
            done.set()

        task = asyncio.create_task(rest())
        short = await slots.generate(gen(STORIES[1], 5, stop=["\n"]))
        first = not done.is_set()
        await task
        return "".join(texts), short[0], first

    long_text, short, first = loop.run_until_complete(main())
    assert first and short.completion_tokens <= 5
    assert long_text == alone(raw, slots, STORIES[0], 200)
    assert short.text == alone(raw, slots, STORIES[1], 5, stop=["\n"])


def test_choices_share_one_prompt_and_seeds_reproduce(loop, slots, raw):
    greedy = loop.run_until_complete(slots.generate(gen(STORIES[2], 16, n=3)))
    assert [g.text for g in greedy] == [alone(raw, slots, STORIES[2], 16)] * 3
    sampled = [loop.run_until_complete(slots.generate(gen(STORIES[2], 16, n=3, temperature=0.9, seed=7)))
               for _ in range(2)]
    assert [g.text for g in sampled[0]] == [g.text for g in sampled[1]]
    assert len({g.text for g in sampled[0]}) > 1  # each choice draws with its own seed


def test_a_cancelled_stream_frees_the_only_slot(loop, raw):
    one = started(loop, slots=1, prefix_cache=False)
    try:
        async def main():
            chunks = one.stream(gen(STORIES[3], 1000))
            await anext(chunks)
            waiting = asyncio.create_task(one.generate(gen(STORIES[4], 6)))
            await chunks.aclose()
            return await waiting

        out = loop.run_until_complete(main())
        assert out[0].text == alone(raw, one, STORIES[4], 6)
        assert one.steps_run < 200  # the cancelled request stopped long before its 1000 tokens
    finally:
        loop.run_until_complete(one.aclose())


def test_a_prompt_starting_like_a_finished_one_reuses_its_cells(loop):
    cached = started(loop, slots=2)
    try:
        first = [SYSTEM, {"role": "user", "content": "How much is item 3?"}]
        second = [SYSTEM, {"role": "user", "content": "How much is item 12?"}]
        loop.run_until_complete(cached.generate(gen(first, 8)))
        out = loop.run_until_complete(cached.generate(gen(second, 8)))
        assert cached.prefix_hits >= 1 and cached.tokens_reused >= cached.count_tokens(SYSTEM["content"])
        assert out[0].completion_tokens > 0
    finally:
        loop.run_until_complete(cached.aclose())


def test_more_choices_than_slots_is_the_clients_error(loop, slots):
    from slm_fusion.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="slots=4") as e:
        loop.run_until_complete(slots.generate(gen(STORIES[0], 4, n=5)))
    assert e.value.param == "n"
