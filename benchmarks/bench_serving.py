"""Local serving at engine speed: the gateway's transformers and llama.cpp backends against their raw engines.

One run, side by side, SmolLM2-135M-Instruct, greedy, 64 new tokens, 2 threads for every engine:
1. transformers, 8 simultaneous requests: raw `model.generate` (one batch of 8) vs the gateway with continuous
   batching vs the gateway as it was (`continuous: false`, no prefix cache): total tokens/s, TTFT, inter-token latency.
2. transformers, staggered arrivals: 16 requests 0.4 s apart and 32 requests as a Poisson stream (rate stated), both
   gateway modes: tokens/s and TTFT p50/p95/max.
3. prefix reuse: requests sharing a ~300-token system prompt, one at a time: TTFT with and without the prefix cache.
4. a vote's samples: one request with n=5 vs n=1 (temperature 0.7), wall time.
5. llama.cpp: raw llama-cpp-python single stream vs the gateway; 8 concurrent requests through `llama_cpp.server`
   (llama-cpp-python's own OpenAI server, same GGUF) vs the gateway.
6. profile: where a batch's time goes in each backend (model forward vs our loop).
7. multi-LoRA: 3 adapters on one engine, resident parameter bytes and mixed-adapter batch speed.
Every gateway and `llama_cpp.server` is a real HTTP server in its own process; the client streams SSE with httpx.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from benchmarks.bench_gateway import PY, _free_port, _our_gateway, _process

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results" / "serving"
console = Console(width=180)

THREADS = 2
PROMPTS = [f"Write a short story about {thing}." for thing in
           ("a lighthouse keeper", "a lost key", "a baker at dawn", "a red bicycle", "two rival chess players",
            "a train in the snow", "a garden robot", "a quiet library")]
SHARED_PREFIX = ("You are the assistant of a hardware shop. Prices: " + ", ".join(
    f"item {i} costs {i * 3 + 1} dollars" for i in range(40)) + ". Answer in one short sentence.")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


async def _stream(client: httpx.AsyncClient, url: str, body: dict, start: float) -> dict:
    """One streamed chat request: time to first content, the gaps between content chunks, completion tokens."""
    sent = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
    tokens = tokens or len(times)  # llama_cpp.server sends no usage when streaming: one content chunk per token
    return {"sent": sent - start, "ttft": times[0] - sent if times else float("nan"),
            "itl": [b - a for a, b in itertools.pairwise(times)], "tokens": tokens, "end": time.perf_counter() - start}


async def _arrivals(url: str, model: str, offsets: list[float], prompts: list[str], max_tokens: int,
                    system: str | None = None) -> dict:
    """Requests sent at the given offsets (seconds from start); totals over the whole run."""
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()

        async def one(offset: float, prompt: str) -> dict:
            await asyncio.sleep(max(0.0, offset - (time.perf_counter() - start)))  # the arrival schedule itself
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return await _stream(client, url, {"model": model, "messages": messages, "max_tokens": max_tokens,
                                               "temperature": 0}, start)

        runs = await asyncio.gather(*(one(o, p) for o, p in zip(offsets, prompts, strict=True)))
    tokens = sum(r["tokens"] for r in runs)
    span = max(r["end"] for r in runs) - min(r["sent"] for r in runs)
    ttft = [r["ttft"] for r in runs]
    itl = [g for r in runs for g in r["itl"]]
    return {"requests": len(runs), "tokens": tokens, "seconds": round(span, 2), "tok_per_s": round(tokens / span, 1),
            "ttft_p50_s": round(_pct(ttft, 0.5), 3), "ttft_p95_s": round(_pct(ttft, 0.95), 3),
            "ttft_max_s": round(max(ttft), 3), "itl_p50_ms": round(_pct(itl, 0.5) * 1000, 1),
            "itl_p95_ms": round(_pct(itl, 0.95) * 1000, 1)}


def _raw_generate(max_tokens: int) -> dict:
    """transformers `generate` on the 8 prompts as one left-padded batch, greedy, the engine's own speed."""
    import torch

    from reasonlite.models import load_model

    torch.set_num_threads(THREADS)
    model, tok = load_model("smollm2-135m-instruct")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        seconds = time.perf_counter() - start
    new = out[:, enc.input_ids.shape[1]:]
    eos = tok.eos_token_id
    tokens = int(sum(int((row != eos).cumprod(0).sum()) for row in new))  # up to each row's first EOS
    return {"requests": 8, "tokens": tokens, "seconds": round(seconds, 2), "tok_per_s": round(tokens / seconds, 1)}


def _smol(continuous: bool) -> dict:
    model = {"name": "smol", "backend": "transformers", "model": "smollm2-135m-instruct", "max_batch_size": 16,
             "max_concurrency": 32, "torch_threads": THREADS, "batch_wait_ms": 10, "continuous": continuous}
    if not continuous:
        model["prefix_cache"] = False  # the backend as it was before continuous batching
    return {"server": {"access_log": False}, "models": [model]}


def _poisson(n: int, rate: float, seed: int = 0) -> list[float]:
    rnd, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rnd.expovariate(rate)
    return out


def bench_transformers(quick: bool) -> dict:
    max_tokens = 16 if quick else 64
    n_stagger, rate = (6, 2.0) if quick else (16, 2.0)
    n_poisson = 8 if quick else 32
    console.print("[cyan]transformers: raw generate (batch 8)[/cyan]")
    results: dict = {"raw_generate_batch8": _raw_generate(max_tokens), "max_tokens": max_tokens,
                     "poisson_rate_per_s": rate}
    for mode, continuous in (("continuous", True), ("as_before", False)):
        with _our_gateway(_smol(continuous), cpus=None, name=f"serving-{mode}") as (url, _):
            asyncio.run(_arrivals(url, "smol", [0.0], ["Hi"], 4))  # warm-up
            console.print(f"[cyan]transformers gateway ({mode}): 8 at once, staggered, Poisson, prefix, vote[/cyan]")
            r = results[mode] = {}
            r["simultaneous_8"] = asyncio.run(_arrivals(url, "smol", [0.0] * 8, PROMPTS, max_tokens))
            r["staggered_0.4s"] = asyncio.run(_arrivals(
                url, "smol", [0.4 * i for i in range(n_stagger)], (PROMPTS * 4)[:n_stagger], max_tokens))
            r["poisson"] = asyncio.run(_arrivals(url, "smol", _poisson(n_poisson, rate), (PROMPTS * 4)[:n_poisson],
                                                 max_tokens))
            r["prefix_ttft"] = _prefix_ttft(url)
            r["vote"] = _vote(url, max_tokens)
    return results


def _prefix_ttft(url: str, n: int = 6) -> dict:
    """One at a time, each a different question after the same long system prompt (the first one fills the cache)."""
    runs = [asyncio.run(_arrivals(url, "smol", [0.0], [f"How much are {k} of item {k}?"], 1, system=SHARED_PREFIX))
            for k in range(n + 1)]
    ttft = [r["ttft_p50_s"] for r in runs[1:]]
    return {"shared_prefix_chars": len(SHARED_PREFIX), "ttft_p50_s": round(statistics.median(ttft), 3)}


def _vote(url: str, max_tokens: int) -> dict:
    def once(n: int) -> float:
        body = {"model": "smol", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": max_tokens,
                "temperature": 0.7, "seed": 1, "n": n}
        start = time.perf_counter()
        httpx.post(url + "/v1/chat/completions", json=body, timeout=600).raise_for_status()
        return time.perf_counter() - start

    one = statistics.median(once(1) for _ in range(3))
    five = statistics.median(once(5) for _ in range(3))
    return {"n1_s": round(one, 2), "n5_s": round(five, 2), "ratio": round(five / one, 2)}


# ---------------------------------------------------------------------------------------------- llama.cpp


def bench_llamacpp(quick: bool) -> dict:
    try:
        import llama_cpp
        import llama_cpp.server.app
    except ImportError as e:
        return {"skipped": f"llama-cpp-python or its server extra is missing ({e}); run `make bench`"}
    from reasonlite.models import smollm2_gguf

    gguf = str(smollm2_gguf())
    max_tokens = 32 if quick else 128
    messages = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}]
    config = {"server": {"access_log": False}, "models": [
        {"name": "smol", "backend": "llamacpp", "model": gguf, "n_threads": THREADS, "max_concurrency": 8,
         "slots": 8}]}
    results: dict = {"max_tokens": max_tokens}
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=2048, n_threads=THREADS, verbose=False)
    with _our_gateway(config, cpus=None, name="serving-llamacpp") as (gw, _):
        from slm_fusion.backends.llamacpp import LlamaCppBackend
        from slm_fusion.config import LlamaCppModel

        fmt = LlamaCppBackend(LlamaCppModel.model_validate(config["models"][0]))
        fmt.llm = llm
        fmt.chat_template = llm.metadata.get("tokenizer.chat_template")
        prompt = fmt.format_chat(messages)
        body = {"model": "smol", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        httpx.post(gw + "/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=120)  # warm-up
        llm.create_completion(prompt=prompt, max_tokens=4, temperature=0)
        raw, ours = [], []
        for _ in range(2 if quick else 3):  # interleaved, best of: load drift hits both alike
            start = time.perf_counter()
            n = llm.create_completion(prompt=prompt, max_tokens=max_tokens, temperature=0)["usage"]["completion_tokens"]
            raw.append(n / (time.perf_counter() - start))
            start = time.perf_counter()
            r = httpx.post(gw + "/v1/chat/completions", json=body, timeout=600).json()
            ours.append(r["usage"]["completion_tokens"] / (time.perf_counter() - start))
        results["single"] = {"raw_tok_per_s": round(max(raw), 1), "gateway_tok_per_s": round(max(ours), 1),
                             "ratio": round(max(ours) / max(raw), 3)}
        llm.close()
        console.print("[cyan]llama.cpp: 8 concurrent, gateway vs llama_cpp.server[/cyan]")
        results["concurrent_8_gateway"] = asyncio.run(_arrivals(gw, "smol", [0.0] * 8, PROMPTS, max_tokens))
    port = _free_port()
    with _process("llama-cpp-server", [PY, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(THREADS),
                                       "--n_ctx", "2048", "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)],
                  f"http://127.0.0.1:{port}/v1/models", None):
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_arrivals(url, "smol", [0.0], ["Hi"], 4))  # warm-up
        results["concurrent_8_llama_cpp_server"] = asyncio.run(_arrivals(url, gguf, [0.0] * 8, PROMPTS, max_tokens))
    return results


# ------------------------------------------------------------------------------------------------ profile


def bench_profile(quick: bool) -> dict:
    """Where one batch's time goes: 8 requests on each backend in this process, the worker's time inside the
    model's forward (transformers) / llama_decode (llama.cpp) against its whole busy time (forward + our loop:
    sampling, detokenising, stop checks, cache joins)."""
    from slm_fusion.backends.base import GenerationRequest, make_backend
    from slm_fusion.config import LlamaCppModel, TransformersModel

    max_tokens = 16 if quick else 64
    configs = [TransformersModel(name="smol", backend="transformers", model="smollm2-135m-instruct",
                                 torch_threads=THREADS, batch_wait_ms=10)]
    try:
        import llama_cpp  # noqa: F401

        from reasonlite.models import smollm2_gguf

        configs.append(LlamaCppModel(name="smol", backend="llamacpp", model=str(smollm2_gguf()), n_threads=THREADS,
                                     slots=8))
    except ImportError:
        pass
    out = {}
    for cfg in configs:
        backend = make_backend(cfg)

        async def batch(backend=backend):
            await backend.start()
            try:
                reqs = [GenerationRequest(messages=[{"role": "user", "content": p}], max_tokens=max_tokens,
                                          temperature=0) for p in PROMPTS]
                await backend.generate(reqs[0])  # warm-up
                backend.forward_s = backend.busy_s = 0.0
                start = time.perf_counter()
                gens = await asyncio.gather(*(backend.generate(r) for r in reqs))
                return sum(g[0].completion_tokens for g in gens), time.perf_counter() - start
            finally:
                await backend.aclose()

        tokens, seconds = asyncio.run(batch())
        out[cfg.backend] = {"tokens": tokens, "seconds": round(seconds, 2), "tok_per_s": round(tokens / seconds, 1),
                            "forward_s": round(backend.forward_s, 2), "busy_s": round(backend.busy_s, 2),
                            "forward_share": round(backend.forward_s / max(backend.busy_s, 1e-9), 3)}
    return out


# ---------------------------------------------------------------------------------------------- multi-LoRA


def bench_multilora(quick: bool) -> dict:
    """Three LoRA adapters (r=16 on every linear layer, as our students train) on one SmolLM2 engine: resident
    parameter bytes against the base alone, and 8 requests spread over the 3 adapters against 8 on one adapter."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model

    from reasonlite.models import load_model
    from slm_fusion.backends.base import GenerationRequest
    from slm_fusion.backends.transformers import TransformersBackend
    from slm_fusion.config import TransformersModel

    max_tokens = 16 if quick else 48
    folder = Path(tempfile.mkdtemp(prefix="multilora-"))
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model, _ = load_model("smollm2-135m-instruct", device="cpu")
        cfg = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        get_peft_model(model, cfg).save_pretrained(folder / f"a{seed}")
        paths.append(str(folder / f"a{seed}"))
        del model

    def nbytes(m) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    engine = TransformersBackend(TransformersModel(name="base", backend="transformers", model="smollm2-135m-instruct",
                                                   torch_threads=THREADS, batch_wait_ms=20, prefix_cache=False))

    async def main():
        await engine.start()
        try:
            base_bytes = nbytes(engine.model)

            def req(i: int, adapter: str) -> GenerationRequest:
                return GenerationRequest(messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=max_tokens,
                                         temperature=0, adapter=adapter)

            for p in paths:  # load all three (and warm up)
                await engine.generate(req(0, p))
            resident = nbytes(engine.model)
            from slm_fusion.backends.lora_batch import BatchedLoRA

            one, mixed = [paths[0]] * 8, [paths[i % 3] for i in range(8)]
            cases = {"one_adapter": (one, True), "three_adapters": (mixed, True), "three_adapters_peft": (mixed, False)}
            runs: dict[str, list[tuple[int, float]]] = {name: [] for name in cases}
            for _ in range(1 if quick else 2):  # rounds, cases interleaved: the box's load drifts
                for name, (chosen, gathered) in cases.items():
                    lora = BatchedLoRA(engine.model)
                    if gathered:  # one gathered bmm per layer ...
                        lora.install()
                    else:  # ... or PEFT's per-adapter sub-batches
                        lora.uninstall()
                    start = time.perf_counter()
                    gens = await asyncio.gather(*(engine.generate(req(i, a)) for i, a in enumerate(chosen)))
                    runs[name].append((sum(g[0].completion_tokens for g in gens), time.perf_counter() - start))
            BatchedLoRA(engine.model).install()
            timings = {name: {"tokens": sum(t for t, _ in r), "seconds": round(sum(s for _, s in r), 2),
                              "tok_per_s": round(sum(t for t, _ in r) / sum(s for _, s in r), 1)}
                       for name, r in runs.items()}
            return base_bytes, resident, timings
        finally:
            await engine.aclose()

    base_bytes, resident, timings = asyncio.run(main())
    return {"base_mb": round(base_bytes / 2**20, 1), "with_3_adapters_mb": round(resident / 2**20, 1),
            "memory_ratio": round(resident / base_bytes, 3), **timings,
            "mixed_vs_one_adapter": round(timings["three_adapters"]["tok_per_s"] / timings["one_adapter"]["tok_per_s"], 3),
            "peft_mixed_vs_one_adapter": round(timings["three_adapters_peft"]["tok_per_s"]
                                               / timings["one_adapter"]["tok_per_s"], 3)}


# ------------------------------------------------------------------------------------------------- report


COLUMNS = ["case", "engine", "tok/s", "TTFT p50 s", "TTFT p95 s", "TTFT max s", "ITL p50 ms", "ITL p95 ms"]


def _table(res: dict) -> list[dict]:
    rows = []
    t = res.get("transformers", {})
    if "raw_generate_batch8" in t:
        rows.append({"case": "transformers 8 at once", "engine": "raw generate (batch 8)",
                     "tok/s": t["raw_generate_batch8"]["tok_per_s"]})
    for mode in ("continuous", "as_before"):
        for case, key in (("8 at once", "simultaneous_8"), ("16 staggered 0.4 s", "staggered_0.4s"),
                          (f"32 Poisson {t.get('poisson_rate_per_s')}/s", "poisson")):
            r = t.get(mode, {}).get(key)
            if r:
                rows.append({"case": f"transformers {case}", "engine": f"gateway ({mode})", "tok/s": r["tok_per_s"],
                             "TTFT p50 s": r["ttft_p50_s"], "TTFT p95 s": r["ttft_p95_s"],
                             "TTFT max s": r["ttft_max_s"], "ITL p50 ms": r["itl_p50_ms"],
                             "ITL p95 ms": r["itl_p95_ms"]})
        if t.get(mode):
            rows.append({"case": "300-token shared prefix, one at a time", "engine": f"gateway ({mode})",
                         "TTFT p50 s": t[mode]["prefix_ttft"]["ttft_p50_s"]})
            v = t[mode]["vote"]
            rows.append({"case": "n=5 vs n=1 wall time", "engine": f"gateway ({mode})",
                         "tok/s": f"{v['n5_s']} s vs {v['n1_s']} s = {v['ratio']}x"})
    ll = res.get("llamacpp", {})
    if "single" in ll:
        rows.append({"case": "llama.cpp single stream", "engine": "raw llama-cpp-python",
                     "tok/s": ll["single"]["raw_tok_per_s"]})
        rows.append({"case": "llama.cpp single stream", "engine": "gateway",
                     "tok/s": f"{ll['single']['gateway_tok_per_s']} ({ll['single']['ratio']}x raw)"})
    for engine, key in (("llama_cpp.server", "concurrent_8_llama_cpp_server"), ("gateway", "concurrent_8_gateway")):
        r = ll.get(key)
        if r:
            rows.append({"case": "llama.cpp 8 at once", "engine": engine, "tok/s": r["tok_per_s"],
                         "TTFT p50 s": r["ttft_p50_s"], "TTFT p95 s": r["ttft_p95_s"], "TTFT max s": r["ttft_max_s"],
                         "ITL p50 ms": r["itl_p50_ms"], "ITL p95 ms": r["itl_p95_ms"]})
    for backend, p in res.get("profile", {}).items():
        rows.append({"case": f"profile, 8 at once: {p['forward_share']:.0%} of the worker's time in the model",
                     "engine": f"{backend} backend (in process)", "tok/s": p["tok_per_s"]})
    m = res.get("multilora")
    if m:
        rows.append({"case": f"multi-LoRA: 3 adapters resident = {m['memory_ratio']}x the base's parameter bytes",
                     "engine": "transformers, 8 on one adapter", "tok/s": m["one_adapter"]["tok_per_s"]})
        rows.append({"case": f"multi-LoRA: 8 over 3 adapters = {m['mixed_vs_one_adapter']}x one adapter's tok/s",
                     "engine": "transformers, 8 over 3 adapters (gathered bmm)", "tok/s": m["three_adapters"]["tok_per_s"]})
        rows.append({"case": f"multi-LoRA: PEFT's sub-batches = {m['peft_mixed_vs_one_adapter']}x one adapter's tok/s",
                     "engine": "transformers, 8 over 3 adapters (PEFT)",
                     "tok/s": m["three_adapters_peft"]["tok_per_s"]})
    return [{c: row.get(c, "") for c in COLUMNS} for row in rows]  # one shape: run.py's Markdown takes row 0's keys


def run(quick: bool = False, only: str | None = None) -> dict:
    res: dict = {}
    if only in (None, "transformers"):
        res["transformers"] = bench_transformers(quick)
    if only in (None, "llamacpp"):
        res["llamacpp"] = bench_llamacpp(quick)
    if only in (None, "profile"):
        res["profile"] = bench_profile(quick)
    if only in (None, "multilora"):
        res["multilora"] = bench_multilora(quick)
    res["table"] = _table(res)
    table = Table(title="local serving (SmolLM2-135M, greedy)")
    for c in COLUMNS:
        table.add_column(c)
    for row in res["table"]:
        table.add_row(*(str(row[c]) for c in COLUMNS))
    console.print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["transformers", "llamacpp", "profile", "multilora"])
    args = parser.parse_args()
    run(quick=args.quick, only=args.only)
