"""Continuous batching and prefix reuse on the transformers backend (tiny random Llama, greedy).

Every batched output is compared with the same request decoded alone on a backend that neither batches nor
reuses prefixes, so a wrong padding, position or cache join shows up as a different text.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from slm_fusion.backends.base import GenerationRequest
from slm_fusion.backends.prefix_cache import MIN_TOKENS, PrefixCache
from slm_fusion.backends.transformers import TransformersBackend
from slm_fusion.config import TransformersModel

SYSTEM = {"role": "system", "content": "You answer questions about the shop's price list. " * 12}


def backend(**kw) -> TransformersBackend:
    cfg = {"name": "tiny", "backend": "transformers", "model": "tiny-random-llama", "torch_threads": 1,
           "batch_wait_ms": 20, **kw}
    return TransformersBackend(TransformersModel.model_validate(cfg))


def ask(content: str, max_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[SYSTEM, {"role": "user", "content": content}], max_tokens=max_tokens,
                             temperature=0, **kw)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def reference(loop):
    """Each request alone: no joining, no prefix reuse."""
    b = backend(continuous=False, prefix_cache=False, max_batch_size=1)
    loop.run_until_complete(b.start())
    yield b
    loop.run_until_complete(b.aclose())


@pytest.fixture()
def live(loop):
    b = backend()
    loop.run_until_complete(b.start())
    yield b
    loop.run_until_complete(b.aclose())


def alone(loop, reference, req: GenerationRequest) -> list[str]:
    return [g.text for g in loop.run_until_complete(reference.generate(req))]


def test_a_request_joins_a_running_batch_and_leaves_it_first(loop, live, reference):
    long, short = ask("Tell me a long story about apples", 600), ask("How much are pears?", 6)
    long_done = asyncio.Event()

    async def main():
        chunks = live.stream(long)
        first = await anext(chunks)  # the long request is decoding now
        texts = [first.text]

        async def finish_long():
            async for c in chunks:
                texts.append(c.text)
            long_done.set()

        task = asyncio.create_task(finish_long())
        steps_before = live.steps_run
        short_out = await live.generate(short)
        finished_first = not long_done.is_set()
        steps_short = live.steps_run - steps_before
        await task
        return "".join(texts), short_out[0].text, finished_first, steps_short

    long_text, short_text, finished_first, steps_short = loop.run_until_complete(main())
    assert finished_first  # the short request did not wait for the long one's batch to end
    assert steps_short < 100  # it took about its own 6 steps, not the long request's remaining ~590
    assert live.batches_run == 2  # two admissions into one running batch
    assert long_text == alone(loop, reference, long)[0]
    assert short_text == alone(loop, reference, short)[0]


def test_joined_requests_keep_their_own_stop_sequences_and_limits(loop, live, reference):
    first = alone(loop, reference, ask("Count the apples", 30))[0]
    stop = first[len(first) // 2:len(first) // 2 + 3]
    reqs = [ask("Count the apples", 30, stop=[stop]), ask("Count the apples", 30), ask("Name a fruit", 9),
            ask("Name a fruit", 17, n=3)]

    async def main():
        return await asyncio.gather(*(live.generate(r) for r in reqs))

    outs = loop.run_until_complete(main())
    assert stop not in outs[0][0].text and outs[0][0].text == first[:first.find(stop)]
    for req, out in zip(reqs, outs, strict=True):
        assert [g.text for g in out] == alone(loop, reference, req)
    assert [g.finish_reason for g in outs[2]] == ["length"] and outs[2][0].completion_tokens == 9


def test_a_cancelled_stream_frees_its_slot_for_a_waiting_request(loop, reference):
    one = backend(max_batch_size=1)
    loop.run_until_complete(one.start())
    waiting = ask("How much are pears?", 5)

    async def main():
        chunks = one.stream(ask("Tell me a long story about apples", 1500))
        await anext(chunks)
        pending = asyncio.create_task(one.generate(waiting))  # no room: the only slot is taken
        await chunks.aclose()  # the client goes away
        return await pending

    try:
        out = loop.run_until_complete(main())
        assert out[0].text == alone(loop, reference, waiting)[0]
        assert one.steps_run < 200  # the cancelled request stopped decoding long before its 1500 tokens
    finally:
        loop.run_until_complete(one.aclose())


def test_a_shared_prompt_prefix_is_computed_once_and_reused(loop, live, reference):
    first, second = ask("How much are pears?", 8), ask("How much are plums today?", 8)
    got_first = [g.text for g in loop.run_until_complete(live.generate(first))]
    got_second = [g.text for g in loop.run_until_complete(live.generate(second))]
    stats = live.prefixes.stats()
    assert stats["hits"] == 1 and stats["tokens_reused"] >= live.count_tokens(SYSTEM["content"])
    assert got_first == alone(loop, reference, first) and got_second == alone(loop, reference, second)
    # n choices of one request share one prompt computation and still decode as n independent rows
    voted = ask("How much are plums today?", 8, n=5)
    texts = [g.text for g in loop.run_until_complete(live.generate(voted))]
    assert texts == alone(loop, reference, voted) and len(set(texts)) == 1


def _layers(n_tokens: int, value: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, n_tokens, 4), value), torch.full((1, 2, n_tokens, 4), value)) for _ in range(2)]


def test_prefix_cache_finds_the_longest_common_prefix_and_evicts_the_least_recently_used():
    per_token = sum(k.nbytes + v.nbytes for k, v in _layers(1))
    cache = PrefixCache(capacity_bytes=per_token * 3 * MIN_TOKENS)
    a = list(range(2 * MIN_TOKENS))
    b = a[:MIN_TOKENS + 3] + [999] * (MIN_TOKENS - 3)
    cache.insert(a, _layers(len(a), 1.0))
    reused, layers = cache.lookup(b + [5])
    assert reused == MIN_TOKENS + 3 and layers[0][0].shape[-2] == MIN_TOKENS + 3
    assert cache.lookup(a)[0] == len(a) - 1  # one token is always left to compute
    assert cache.lookup(list(range(100, 140)))[1] is None  # nothing in common
    assert cache.lookup(a[:MIN_TOKENS - 2] + [7] * 30)[1] is None  # too short a prefix to be worth it
    cache.insert(b, _layers(len(b), 2.0))  # 4 * MIN_TOKENS tokens > capacity: `a` (least recent) goes
    assert cache.evictions == 1 and len(cache) == 1 and cache.lookup(a + [1])[0] == MIN_TOKENS + 3
    with pytest.raises(ValueError, match="prompt tokens"):
        cache.insert(a, _layers(3))
