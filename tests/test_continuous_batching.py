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
    cache.insert(a, None, _layers(len(a), 1.0))
    reused, layers = cache.lookup(b + [5])
    assert reused == MIN_TOKENS + 3 and layers[0][0].shape[-2] == MIN_TOKENS + 3
    assert cache.lookup(a)[0] == len(a) - 1  # one token is always left to compute
    assert cache.lookup(list(range(100, 140)))[1] is None  # nothing in common
    assert cache.lookup(a[:MIN_TOKENS - 2] + [7] * 30)[1] is None  # too short a prefix to be worth it
    cache.insert(b, None, _layers(len(b), 2.0))  # 4 * MIN_TOKENS tokens > capacity: `a` (least recent) goes
    assert cache.evictions == 1 and len(cache) == 1 and cache.lookup(a + [1])[0] == MIN_TOKENS + 3
    with pytest.raises(ValueError, match="prompt tokens"):
        cache.insert(a, None, _layers(3))


# ------------------------------------------------------------------------------------------------ multi-LoRA


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[str]:
    """Three random LoRA adapters (non-zero B, so each changes the output) for the tiny model."""
    from peft import LoraConfig, get_peft_model

    from reasonlite.models import load_model

    paths = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model, _ = load_model("tiny-random-llama", device="cpu")
        cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
        out = tmp_path_factory.mktemp(f"adapter{seed}")
        get_peft_model(model, cfg).save_pretrained(out)
        paths.append(str(out))
    return paths


def test_a_batch_mixing_adapters_gives_each_row_its_adapter_alone(loop, reference, adapters):
    from slm_fusion.backends.adapters import adapter_backend

    shared: dict = {}
    a, b = (adapter_backend(TransformersModel.model_validate(
        {"name": name, "backend": "transformers", "model": "tiny-random-llama", "adapter": path, "torch_threads": 1,
         "batch_wait_ms": 50, "max_adapters": 2}), shared) for name, path in zip("ab", adapters[:2], strict=True))
    assert a.engine is b.engine  # one copy of the base weights
    lone = backend(continuous=False, prefix_cache=False, max_batch_size=1)
    for x in (a, b, lone):
        loop.run_until_complete(x.start())
    try:
        reqs = [ask("How much are pears?", 12), ask("Name a fruit", 12)]

        async def mixed():
            return await asyncio.gather(a.generate(reqs[0]), b.generate(reqs[0]), a.engine.generate(reqs[1]),
                                        b.generate(reqs[1]))

        together = [o[0].text for o in loop.run_until_complete(mixed())]
        assert a.engine.batches_run == 1  # all four rows were admitted into one batch

        def alone(req, path):
            r = GenerationRequest(**{**req.__dict__, "adapter": path})
            return loop.run_until_complete(lone.generate(r))[0].text

        assert together == [alone(reqs[0], adapters[0]), alone(reqs[0], adapters[1]), alone(reqs[1], None),
                            alone(reqs[1], adapters[1])]
        assert len({together[0], together[1], alone(reqs[0], None)}) == 3  # each adapter changes the answer
        # max_adapters=2: a third adapter unloads the least recently used one, and still answers as it does alone
        engine = a.engine
        loop.run_until_complete(a.generate(reqs[1]))  # adapter 0 is now the most recently used
        third = loop.run_until_complete(engine.generate(GenerationRequest(**{**reqs[0].__dict__,
                                                                             "adapter": adapters[2]})))
        assert list(engine.adapters) == [adapters[0], adapters[2]]
        assert third[0].text == alone(reqs[0], adapters[2])
    finally:
        for x in (a, b, lone):
            loop.run_until_complete(x.aclose())


def test_adapter_models_are_routed_and_served_through_the_official_client(adapters, loop, reference):
    import openai
    from gateway_helpers import TINY, gateway_of, serve_gateway

    models = [{**TINY, "name": f"skill-{i}", "adapter": path} for i, path in enumerate(adapters[:2])]
    config = {"models": models, "server": {"access_log": False},
              "routers": {"skills": {"type": "rules", "default": "skill-0",
                                     "rules": [{"model": "skill-1", "keywords": ["fruit"]}]}},
              "virtual_models": {"shop": {"router": "skills"}}}
    with serve_gateway(config) as served:
        gw = gateway_of(served)
        engines = {id(h.backends[0].engine) for h in gw.handles.values()}
        client = openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0)
        asked = {"messages": [SYSTEM, {"role": "user", "content": "Name a fruit"}], "max_tokens": 8, "temperature": 0}
        routed = client.chat.completions.with_raw_response.create(model="shop", **asked)
        direct = client.chat.completions.create(model="skill-0", **asked)
    assert len(engines) == 1  # two models, one base
    assert routed.headers["x-slm-fusion-model"] == "skill-1"
    want = {path: loop.run_until_complete(reference.generate(GenerationRequest(
        messages=asked["messages"], max_tokens=8, temperature=0, adapter=path)))[0].text for path in adapters[:2]}
    assert routed.parse().choices[0].message.content == want[adapters[1]]
    assert direct.choices[0].message.content == want[adapters[0]]


def test_an_adapter_model_on_its_own_backend_still_applies_its_adapter(loop, reference, adapters):
    own = backend(adapter=adapters[0])  # what a Ray deployment or a plain make_backend(config) builds
    loop.run_until_complete(own.start())
    try:
        req = ask("How much are pears?", 10)
        got = loop.run_until_complete(own.generate(req))[0].text
        want = loop.run_until_complete(reference.generate(GenerationRequest(**{**req.__dict__,
                                                                                "adapter": adapters[0]})))[0].text
        assert got == want != loop.run_until_complete(reference.generate(req))[0].text
    finally:
        loop.run_until_complete(own.aclose())
