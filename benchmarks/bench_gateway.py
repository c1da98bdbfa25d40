"""SLM-Fusion gateway benchmark: proxy overhead vs LiteLLM, batching, structured outputs, soak.

1. Proxy overhead. A fast mock upstream (raw ASGI on uvicorn) is called directly, through LiteLLM's proxy and
   through our gateway (one worker each, pinned to its own core with taskset; upstream and load generator share the
   other core). Load comes from `wrk` (one Lua script for POST): added latency p50/p99 at concurrency 1 and max
   req/s at concurrency 32, non-streaming and streaming.
2. Batching: SmolLM2-135M on the transformers backend, 8 concurrent chat requests through the gateway,
   max_batch_size=8 vs max_batch_size=1 (one at a time): total completion tokens/s.
3. Soak: 10,000 requests at concurrency 64 against the mock upstream through the gateway: errors, RSS growth.

llama.cpp against raw llama-cpp-python and `llama_cpp.server` is in bench_serving.py.
`run(quick=True)` uses short runs and small counts (and skips LiteLLM unless its venv already exists).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results" / "gateway"
LITELLM_VENV = ROOT / "bench-results" / ".litellm-venv"
PY = sys.executable
console = Console()

CHAT_BODY = {"model": "mock", "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 16}
PROXY_CPU, SIDE_CPU = "1", "0"  # the proxy under test gets a core to itself
BENCH_KEY = "sk-bench-0123456789abcdef0123456789abcdef"  # both proxies authenticate (LiteLLM requires a key)

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"p50_us": %d, "p99_us": %d, "requests": %d, "errors": %d, "non2xx": %d, "duration_us": %d}\\n',
    latency:percentile(50), latency:percentile(99), summary.requests,
    e.connect + e.read + e.write + e.timeout, e.status, summary.duration))
end
"""


# ------------------------------------------------------------------------------------------------ processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin(cpus: str) -> list[str]:
    return ["taskset", "-c", cpus] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


@contextmanager
def _process(name: str, cmd: list[str], ready_url: str, cpus: str | None, env: dict | None = None,
             timeout: float = 180):
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{name}.log", "w") as log:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        proc = subprocess.Popen((_pin(cpus) if cpus else []) + cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {OUT / (name + '.log')}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code < 500:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not become ready at {ready_url}")
                time.sleep(0.25)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def _mock_upstream():
    port = _free_port()
    with _process("mock-upstream", [PY, "-m", "slm_fusion.backends.mock_upstream", "--port", str(port)],
                  f"http://127.0.0.1:{port}/v1/models", SIDE_CPU):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def _our_gateway(config: dict, cpus: str | None = PROXY_CPU, name: str = "slm-fusion", src: str | None = None):
    """`src`: another checkout's `src/` folder (PYTHONPATH), to measure an older gateway in the same run."""
    port = _free_port()
    cfg = OUT / f"{name}.yaml"
    OUT.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps(config))  # JSON is YAML
    env = {"PYTHONPATH": src} if src else None
    with _process(name, [PY, "-m", "slm_fusion.cli", "serve", str(cfg), "--port", str(port), "--log-level",
                         "warning"], f"http://127.0.0.1:{port}/health", cpus, env=env) as proc:
        yield f"http://127.0.0.1:{port}", proc


def _ensure_litellm(install: bool) -> Path | None:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    if not install:
        return None
    console.print("[cyan]installing litellm[proxy] into bench-results/.litellm-venv (one time)...[/cyan]")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True,
                       timeout=1200)
    except (subprocess.SubprocessError, OSError) as e:
        console.print(f"[yellow]LiteLLM could not be installed: {e}[/yellow]")
        return None
    return exe if exe.exists() else None


@contextmanager
def _litellm(exe: Path, upstream: str):
    port = _free_port()
    cfg = OUT / "litellm.yaml"
    cfg.write_text(json.dumps({
        "model_list": [{"model_name": "mock", "litellm_params": {
            "model": "openai/mock", "api_base": upstream + "/v1", "api_key": "sk-none"}}],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": BENCH_KEY},
    }))
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "TELEMETRY": "False"}
    with _process("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                              "--num_workers", "1"], f"http://127.0.0.1:{port}/health/liveliness", PROXY_CPU,
                  env=env, timeout=300):
        yield f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------- load: wrk


def _wrk(url: str, concurrency: int, seconds: float, stream: bool, key: str = BENCH_KEY) -> dict:
    body = {**CHAT_BODY, "stream": True} if stream else CHAT_BODY
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
        script = f.name
    cmd = _pin(SIDE_CPU) + ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, int(seconds))}s", "--timeout", "10s",
                            "-s", script, url + "/v1/chat/completions"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "BENCH_BODY": json.dumps(body), "BENCH_KEY": key},
                         timeout=seconds + 60)
    os.unlink(script)
    m = re.search(r"WRKJSON (\{.*\})", out.stdout)
    if not m:
        raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(m.group(1))
    return {"p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "rps": r["requests"] / (r["duration_us"] / 1e6), "requests": r["requests"],
            "errors": r["errors"] + r["non2xx"]}


def _measure_target(url: str, seconds: float) -> dict:
    _wrk(url, 4, 1, False)  # warm-up: connections, caches, lazy imports
    out = {}
    for stream in (False, True):
        kind = "stream" if stream else "json"
        c1 = _wrk(url, 1, seconds, stream)
        c32 = _wrk(url, 32, seconds, stream)
        out[kind] = {"c1_p50_ms": c1["p50_ms"], "c1_p99_ms": c1["p99_ms"], "c32_rps": c32["rps"],
                     "c32_p50_ms": c32["p50_ms"], "errors": c1["errors"] + c32["errors"]}
    return out


def bench_proxy(quick: bool) -> dict:
    if not shutil.which("wrk"):
        return {"skipped": "wrk not installed (apt-get install -y wrk)"}
    seconds = 2 if quick else 8
    litellm = _ensure_litellm(install=not quick)
    results: dict = {}
    with _mock_upstream() as upstream:
        console.print("[cyan]proxy overhead: direct upstream[/cyan]")
        results["direct"] = _measure_target(upstream, seconds)
        gw_config = {"server": {"access_log": False, "api_keys": [BENCH_KEY]},
                     "models": [{"name": "mock", "backend": "openai", "model": "mock", "base_url": upstream + "/v1",
                                 "max_concurrency": 256, "max_queue": 1024}]}
        with _our_gateway(gw_config) as (gw, _):
            console.print("[cyan]proxy overhead: slm-fusion[/cyan]")
            results["slm_fusion"] = _measure_target(gw, seconds)
        if litellm:
            try:
                with _litellm(litellm, upstream) as ll:
                    console.print("[cyan]proxy overhead: LiteLLM[/cyan]")
                    results["litellm"] = _measure_target(ll, seconds)
            except (RuntimeError, TimeoutError) as e:
                results["litellm"] = {"skipped": str(e)}
        else:
            results["litellm"] = {"skipped": "LiteLLM not installed" + (" (quick mode does not install it)"
                                                                         if quick else "")}
    for kind in ("json", "stream"):
        d, ours = results["direct"][kind], results["slm_fusion"][kind]
        ours["added_p50_ms"] = ours["c1_p50_ms"] - d["c1_p50_ms"]
        ours["added_p99_ms"] = ours["c1_p99_ms"] - d["c1_p99_ms"]
        ll = results["litellm"].get(kind)
        if ll:
            ll["added_p50_ms"] = ll["c1_p50_ms"] - d["c1_p50_ms"]
            ll["added_p99_ms"] = ll["c1_p99_ms"] - d["c1_p99_ms"]
            results.setdefault("ratios", {})[kind] = {
                "added_p50_ours_over_litellm": ours["added_p50_ms"] / max(ll["added_p50_ms"], 1e-9),
                "rps_ours_over_litellm": ours["c32_rps"] / max(ll["c32_rps"], 1e-9),
            }
    return results


def bench_against(baseline_src: str, rounds: int = 4, seconds: float = 6) -> dict:
    """This gateway vs the one in `baseline_src` (another checkout's src/), same mock upstream, same pinned core,
    measured in alternation with the order swapped every round (baseline, ours; ours, baseline; ...): this code
    measured against a copy of itself in a fixed order came out 6-15% slower in second place, so a fixed order
    would report that as a regression. Both run from PYTHONPATH, started the same way."""
    gw_config = {"server": {"access_log": False, "api_keys": [BENCH_KEY]},
                 "models": [{"name": "mock", "backend": "openai", "model": "mock", "base_url": "", "max_concurrency": 256,
                             "max_queue": 1024}]}
    runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
    with _mock_upstream() as upstream:
        gw_config["models"][0]["base_url"] = upstream + "/v1"
        for i in range(rounds):
            order = (("baseline", baseline_src), ("ours", str(ROOT / "src")))
            for name, src in (order if i % 2 == 0 else order[::-1]):
                with _our_gateway(gw_config, name=f"ab-{name}", src=src) as (gw, _):
                    console.print(f"[cyan]round {i + 1}/{rounds}: {name}[/cyan]")
                    runs[name].append(_measure_target(gw, seconds))
    out: dict = {"baseline_src": baseline_src, "rounds": rounds, "seconds": seconds, "runs": runs, "ratios": {}}
    for kind in ("json", "stream"):
        for metric in ("c1_p50_ms", "c1_p99_ms", "c32_rps"):
            base = statistics.median(r[kind][metric] for r in runs["baseline"])
            ours = statistics.median(r[kind][metric] for r in runs["ours"])
            out["ratios"][f"{kind} {metric}"] = {"baseline": base, "ours": ours, "ours_over_baseline": ours / base}
    t = Table(title=f"gateway vs {baseline_src} (median of {rounds} rounds, order swapped each round)")
    for col in ("measure", "baseline", "ours", "ours / baseline"):
        t.add_column(col)
    for name, r in out["ratios"].items():
        t.add_row(name, f"{r['baseline']:.2f}", f"{r['ours']:.2f}", f"{r['ours_over_baseline']:.3f}")
    console.print(t)
    return out


# ------------------------------------------------------------------------------------- transformers batching

PROMPTS = [  # open-ended on purpose: every row runs to max_tokens, so the batch stays full (decode throughput)
    "Write a long story about a dragon who learns to bake bread.", "Describe, in detail, a walk through a forest.",
    "Explain at length how a bicycle works.", "Write a long letter to a friend about your holiday.",
    "Describe the history of the printing press in detail.", "Write a long poem about the sea.",
    "Explain step by step how to cook a risotto.", "Tell a long story about a robot exploring Mars.",
]


@asynccontextmanager
async def _smol_gateway(max_batch_size: int):
    """SmolLM2-135M on the transformers backend (one decode thread) behind an in-process gateway:
    yields (gateway, client). Shared by the batching and structured-output measurements."""
    from slm_fusion.app import create_app
    from slm_fusion.config import FusionConfig

    cfg = FusionConfig.model_validate({"server": {"access_log": False}, "models": [{
        "name": "smol", "backend": "transformers", "model": "smollm2-135m-instruct", "max_batch_size": max_batch_size,
        "batch_wait_ms": 10, "max_concurrency": 8, "torch_threads": 1}]})
    app = create_app(cfg)
    gw = app.state.gateway
    await gw.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=600) as client:
            yield gw, client
    finally:
        await gw.aclose()


async def _ask(client: httpx.AsyncClient, prompt: str, max_tokens: int, **extra) -> tuple[str, int]:
    r = await client.post("/v1/chat/completions", json={
        "model": "smol", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, **extra})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"]


async def _batched_run(max_batch_size: int, max_tokens: int) -> dict:
    async with _smol_gateway(max_batch_size) as (gw, client):
        await _ask(client, "Hi", max_tokens)  # warm-up
        backend = gw.handles["smol"].backends[0]
        batches_before = backend.batches_run
        start = time.perf_counter()
        tokens = sum(n for _, n in await asyncio.gather(*(_ask(client, p, max_tokens) for p in PROMPTS)))
        elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed,
            "decode_batches": backend.batches_run - batches_before}


def bench_batching(quick: bool) -> dict:
    # One decode thread in both modes: the ratio then measures batching, not thread scaling, and stays meaningful
    # on a shared CPU (two spinning OpenMP threads on a loaded 2-core box can run slower than one).
    max_tokens = 16 if quick else 64
    console.print("[cyan]transformers: 8 concurrent requests, dynamic batching vs one at a time[/cyan]")
    batched = asyncio.run(_batched_run(8, max_tokens))
    single = asyncio.run(_batched_run(1, max_tokens))
    return {"max_tokens": max_tokens, "batched": batched, "one_at_a_time": single,
            "speedup": batched["tok_per_s"] / single["tok_per_s"]}


# ------------------------------------------------------------------------------------- structured outputs

ITEM_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["item", "quantity", "in_stock"],
               "properties": {"item": {"type": "string", "maxLength": 24}, "quantity": {"type": "integer"},
                              "in_stock": {"type": "boolean"}}}
ITEM_PROMPTS = [f"Reply with JSON only, keys item, quantity, in_stock: we have {n} {thing} left in the store."
                for n, thing in ((12, "apples"), (0, "pears"), (7, "lamps"), (30, "pens"), (3, "chairs"),
                                 (1, "bikes"), (45, "cups"), (9, "books"))]


def _valid_item(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return (isinstance(obj, dict) and set(obj) == {"item", "quantity", "in_stock"} and isinstance(obj["item"], str)
            and isinstance(obj["quantity"], int) and isinstance(obj["in_stock"], bool))


async def _structured_run(constrained: bool, max_tokens: int, prompts: list[str]) -> dict:
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM_SCHEMA}}}
    fields = extra if constrained else {}
    async with _smol_gateway(8) as (gw, client):
        await _ask(client, "Hi", max_tokens, **fields)  # warm-up: also builds the grammar's tokenizer (once per model)
        backend = gw.handles["smol"].backends[0]
        busy, mask = backend.busy_s, backend.grammars.mask_s
        t0 = time.perf_counter()
        out = await asyncio.gather(*(_ask(client, p, max_tokens, **fields) for p in prompts))
        seconds = time.perf_counter() - t0
        busy, mask = backend.busy_s - busy, backend.grammars.mask_s - mask
    tokens = sum(n for _, n in out)
    # The grammar's own share of the decode worker's time, measured inside the run: unlike the tok/s ratio of two
    # runs it does not move with the load other jobs put on the machine between them.
    return {"valid": sum(_valid_item(t) for t, _ in out), "n": len(out), "tokens": tokens, "seconds": seconds,
            "tok_per_s": tokens / seconds, "mask_ms_per_token": 1000 * mask / tokens, "mask_share": mask / busy,
            "sample": out[0][0][:120]}


PRICE_TOOL = {"type": "function", "function": {
    "name": "get_price", "description": "Total price of a number of items of one product",
    "parameters": {"type": "object", "properties": {"product": {"type": "string", "maxLength": 24},
                                                    "quantity": {"type": "integer", "minimum": 0, "maximum": 1000}},
                   "required": ["product", "quantity"], "additionalProperties": False}}}
TOOL_ASKS = [(n, thing, f"How much do {n} {thing} cost?") for n, thing in (
    (12, "apples"), (3, "pears"), (7, "lamps"), (30, "pens"), (5, "chairs"), (2, "bikes"), (45, "cups"), (9, "books"))]


async def _tools_run(tool_choice: str, max_tokens: int, asks: list) -> dict:
    """SmolLM2 asked to call get_price: calls that come back as tool_calls, and calls with the question's quantity."""
    async with _smol_gateway(8) as (_, client):
        async def one(question: str) -> dict:
            r = await client.post("/v1/chat/completions", json={
                "model": "smol", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": 0, "tools": [PRICE_TOOL], "tool_choice": tool_choice})
            r.raise_for_status()
            return r.json()

        await one("How much is 1 hat?")  # warm-up (the grammar tokenizer is built once per model)
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(q) for _, _, q in asks))
        seconds = time.perf_counter() - t0
    calls, right = 0, 0
    for (n, thing, _), resp in zip(asks, out):
        tool_calls = resp["choices"][0]["message"].get("tool_calls") or []
        if tool_calls and tool_calls[0]["function"]["name"] == "get_price":
            calls += 1
            args = json.loads(tool_calls[0]["function"]["arguments"])
            right += args.get("quantity") == n and thing.rstrip("s") in str(args.get("product", "")).lower()
    tokens = sum(r["usage"]["completion_tokens"] for r in out)
    return {"tool_choice": tool_choice, "n": len(asks), "tool_calls": calls, "right_arguments": right,
            "tokens": tokens, "seconds": seconds, "sample": json.dumps(out[0]["choices"][0]["message"])[:200]}


def bench_structured(quick: bool) -> dict:
    """SmolLM2 on the transformers backend, the same 8 JSON requests with and without `response_format`
    (json_schema): replies that parse and match the schema, and decode tokens/s (the cost of the grammar mask)."""
    prompts = ITEM_PROMPTS[:2] if quick else ITEM_PROMPTS
    max_tokens = 24 if quick else 64
    console.print("[cyan]structured outputs: SmolLM2, json_schema enforced vs asked for in the prompt only[/cyan]")
    plain = asyncio.run(_structured_run(False, max_tokens, prompts))
    constrained = asyncio.run(_structured_run(True, max_tokens, prompts))
    console.print("[cyan]function calling: SmolLM2, tool_choice required (constrained) vs auto[/cyan]")
    asks = TOOL_ASKS[:2] if quick else TOOL_ASKS
    tools = {choice: asyncio.run(_tools_run(choice, 48, asks)) for choice in ("required", "auto")}
    masks = bench_mask_cost(rounds=2 if quick else 5)
    return {"max_tokens": max_tokens, "prompt_only": plain, "enforced": constrained,
            "tok_per_s_ratio": constrained["tok_per_s"] / plain["tok_per_s"],
            # the grammar's cost per token against the unconstrained run's decode time per token (same run)
            "mask_cost_vs_plain_token": constrained["mask_ms_per_token"] / (1000 / plain["tok_per_s"]),
            "tools": tools, "mask_cost": masks}


def bench_mask_cost(rounds: int, batch: int = 8) -> dict:
    """The grammar mask alone, SmolLM2's tokenizer (49k vocabulary), a batch of `batch` rows following real JSON
    replies token by token: `Grammars.mask` (one llguidance fill for the batch into a reused bitmask, one apply) vs
    the row-by-row way it replaced (a bitmask per row, filled and applied one row at a time), alternating, in one
    process. Microseconds per row and token."""
    import llguidance.torch as lt
    import torch

    from reasonlite.models import load_tokenizer
    from slm_fusion.backends.structured import Grammars, grammar_for

    torch.set_num_threads(1)
    tok = load_tokenizer("smollm2-135m-instruct")
    grammars = Grammars(tok, len(tok))
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM_SCHEMA}})
    grammars.check(grammar)
    replies = [tok.encode(f'{{"in_stock":{str(n % 2 == 0).lower()},"item":"{thing}","quantity":{n}}}',
                          add_special_tokens=False)
               for n, thing in ((12, "apples"), (0, "pears"), (7, "lamps"), (30, "pens"), (3, "chairs"),
                                (1, "bikes"), (45, "cups"), (9, "books"))][:batch]
    steps = min(len(r) for r in replies)
    logits = torch.randn(batch, len(tok))

    def follow(apply_masks) -> float:
        rows = [grammars.constraint(grammar) for _ in range(batch)]
        spent = 0.0
        for i in range(steps):
            t0 = time.perf_counter()
            apply_masks(rows)
            spent += time.perf_counter() - t0
            for r, reply in zip(rows, replies):
                r.accept(reply[i])
        return 1e6 * spent / (steps * batch)

    one_by_one = [lt.allocate_token_bitmask(1, len(tok)) for _ in range(batch)]

    def per_row(rows) -> None:
        for b, r in enumerate(rows):
            lt.fill_next_token_bitmask(r.matcher, one_by_one[b], 0)
            lt.apply_token_bitmask_inplace(logits[b][None, :], one_by_one[b])

    def batched(rows) -> None:
        grammars.mask(logits, rows)

    follow(per_row), follow(batched)  # warm-up: llguidance's apply kernel is compiled on first use
    runs: dict[str, list[float]] = {"per_row": [], "batched": []}
    for i in range(rounds):
        for name, fn in ((("per_row", per_row), ("batched", batched)) if i % 2 == 0
                         else (("batched", batched), ("per_row", per_row))):
            runs[name].append(follow(fn))
    out = {name: statistics.median(v) for name, v in runs.items()}
    return {"batch": batch, "rounds": rounds, "us_per_row_token": out, "runs": runs,
            "speedup": out["per_row"] / out["batched"]}


# -------------------------------------------------------------------------------------------------- soak


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _load(url: str, total: int, concurrency: int) -> dict:
    errors = 0
    sent = 0
    kinds: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def worker():
            nonlocal errors, sent
            while sent < total:
                sent += 1
                stream = sent % 4 == 0  # a quarter of the traffic streams
                try:
                    if stream:
                        async with client.stream("POST", "/v1/chat/completions", json={**CHAT_BODY, "stream": True}) as r:
                            body = b"".join([c async for c in r.aiter_bytes()])
                            ok = r.status_code == 200 and body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
                    else:
                        r = await client.post("/v1/chat/completions", json=CHAT_BODY)
                        ok = r.status_code == 200
                    kind = str(r.status_code) if r.status_code != 200 else "bad stream body"
                except httpx.HTTPError as e:
                    ok, kind = False, type(e).__name__
                if not ok:
                    errors += 1
                    kinds[kind] = kinds.get(kind, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"requests": total, "errors": errors, "error_kinds": kinds, "seconds": elapsed, "rps": total / elapsed}


def bench_soak(quick: bool) -> dict:
    total = 500 if quick else 10_000
    console.print(f"[cyan]soak: {total} requests at concurrency 64 through the gateway[/cyan]")
    with _mock_upstream() as upstream:
        config = {"server": {"access_log": False},
                  "models": [{"name": "mock", "backend": "openai", "model": "mock", "base_url": upstream + "/v1",
                              "max_concurrency": 64, "max_queue": 256}]}
        with _our_gateway(config, name="slm-fusion-soak") as (gw, proc):
            asyncio.run(_load(gw, 200, 64))  # warm-up before the baseline RSS
            rss_before = _rss_mb(proc.pid)
            result = asyncio.run(_load(gw, total, 64))
            rss_after = _rss_mb(proc.pid)
            health = httpx.get(gw + "/health").json()
    result.update(rss_before_mb=rss_before, rss_after_mb=rss_after, rss_growth_mb=rss_after - rss_before,
                  in_flight_after=sum(m["in_flight"] + m["queued"] for m in health["models"].values()))
    return result


# ---------------------------------------------------------------------------------------------------- report


def _report(r: dict) -> None:
    proxy = r.get("proxy", {})
    if "direct" in proxy:
        t = Table(title="Gateway overhead in front of a fast mock upstream (one worker, pinned core)")
        for col in ("target", "mode", "c1 p50 ms", "c1 p99 ms", "added p50 ms", "added p99 ms", "c32 req/s", "errors"):
            t.add_column(col)
        for name in ("direct", "litellm", "slm_fusion"):
            for kind in ("json", "stream"):
                row = proxy.get(name, {}).get(kind)
                if row:
                    t.add_row(name, kind, f"{row['c1_p50_ms']:.2f}", f"{row['c1_p99_ms']:.2f}",
                              f"{row.get('added_p50_ms', 0):.2f}", f"{row.get('added_p99_ms', 0):.2f}",
                              f"{row['c32_rps']:.0f}", str(row["errors"]))
        console.print(t)
        for kind, ratio in proxy.get("ratios", {}).items():
            console.print(f"{kind}: our added p50 = {ratio['added_p50_ours_over_litellm']:.2f}x LiteLLM's "
                          f"(target <= 0.2); our req/s = {ratio['rps_ours_over_litellm']:.1f}x LiteLLM's (target >= 5)")
        if "skipped" in proxy.get("litellm", {}):
            console.print(f"LiteLLM: {proxy['litellm']['skipped']}")
    b = r.get("batching")
    if b:
        console.print(f"transformers SmolLM2, 8 concurrent requests x {b['max_tokens']} tokens: batched "
                      f"{b['batched']['tok_per_s']:.1f} tok/s vs one-at-a-time {b['one_at_a_time']['tok_per_s']:.1f} "
                      f"tok/s -> {b['speedup']:.2f}x (target >= 4)")
    st = r.get("structured")
    if st and "enforced" in st:
        e, p = st["enforced"], st["prompt_only"]
        console.print(f"structured outputs, SmolLM2 transformers, {e['n']} requests: replies matching the schema "
                      f"{e['valid']}/{e['n']} enforced vs {p['valid']}/{p['n']} asked in the prompt only; decode "
                      f"{e['tok_per_s']:.1f} vs {p['tok_per_s']:.1f} tok/s ({st['tok_per_s_ratio']:.2f}x)")
        if "mask_ms_per_token" in e:
            console.print(f"  grammar mask: {e['mask_ms_per_token']:.3f} ms per constrained token, "
                          f"{100 * e['mask_share']:.1f}% of the decode worker's time; "
                          f"{100 * st['mask_cost_vs_plain_token']:.1f}% of an unconstrained token's decode time")
    m = (st or {}).get("mask_cost")
    if m:
        t = Table(title=f"grammar mask alone, batch {m['batch']}, median of {m['rounds']} alternating rounds")
        for col in ("way", "us per row and token"):
            t.add_column(col)
        for name, us in m["us_per_row_token"].items():
            t.add_row(name, f"{us:.0f}")
        t.add_row("per_row / batched", f"{m['speedup']:.2f}x")
        console.print(t)
    for t in (st or {}).get("tools", {}).values():
        console.print(f"function calling, SmolLM2 transformers, tool_choice {t['tool_choice']}: {t['tool_calls']}/"
                      f"{t['n']} replies are get_price calls, {t['right_arguments']}/{t['n']} with the question's "
                      f"product and quantity; {t['tokens']} tokens in {t['seconds']:.1f} s")
    s = r.get("soak")
    if s:
        console.print(f"soak: {s['requests']} requests in {s['seconds']:.1f}s ({s['rps']:.0f} req/s), errors "
                      f"{s['errors']}, RSS {s['rss_before_mb']:.1f} -> {s['rss_after_mb']:.1f} MB "
                      f"(+{s['rss_growth_mb']:.1f}), left in flight {s['in_flight_after']}")


def run(quick: bool = False) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    results: dict = {"quick": quick, "cpus": os.cpu_count()}
    for name, fn in (("proxy", bench_proxy), ("soak", bench_soak), ("batching", bench_batching),
                     ("structured", bench_structured)):
        try:
            results[name] = fn(quick)
        except Exception as e:  # noqa: BLE001 — one failing part must not hide the others' numbers
            console.print(f"[red]{name} failed: {type(e).__name__}: {e}[/red]")
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    _report(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("results-quick.json" if quick else "results.json")).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    if "--only-structured" in sys.argv:
        st = bench_structured(quick="--quick" in sys.argv)
        _report({"structured": st})
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "structured.json").write_text(json.dumps(st, indent=2))
    elif "--against" in sys.argv:  # python benchmarks/bench_gateway.py --against ../old-checkout/src
        ab = bench_against(sys.argv[sys.argv.index("--against") + 1])
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "against.json").write_text(json.dumps(ab, indent=2))
    else:
        run(quick="--quick" in sys.argv)
