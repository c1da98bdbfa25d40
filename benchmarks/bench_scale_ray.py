"""Ray Serve engine benchmark: what `--engine ray` costs in front of an upstream, and what a second replica of a
local model buys on this box.

1. Ingress overhead. The same gateway config in front of the fast mock upstream (its own process), served by
   uvicorn (`slm-fusion serve`, its own process) and by Ray Serve (`deploy_ray.run`: Serve's HTTP proxy, then the
   ingress replica running the same FastAPI app). Latency p50/p99 at concurrency 1 and req/s at concurrency 16,
   measured in this process with httpx, one engine after the other.
2. Replica scaling. SmolLM2-135M-Instruct on the transformers backend as a Serve deployment, replicas=1 vs 2 (one
   CPU and one torch thread each), 8 concurrent chat requests of 32 tokens: completion tokens/s and the scaling
   efficiency tps(2) / (2 * tps(1)). On a 2-core machine Ray's controller, proxy and ingress share those cores with
   the replicas, so the figure is this box's, not Ray's.

`python benchmarks/bench_scale_ray.py [--quick]`: a table, and JSON in bench-results/scale_ray/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results" / "scale_ray"
PY = sys.executable
console = Console()

MOCK_BODY = {"model": "mock", "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 16}
SMOL_BODY = {"model": "smol", "messages": [{"role": "user", "content": "Write a short story about a robot."}],
             "max_tokens": 32, "temperature": 0}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become ready in {timeout}s")
        time.sleep(0.2)  # polling a readiness condition


@contextmanager
def _process(cmd: list[str], ready_url: str, timeout: float = 180):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(ready_url, timeout, proc)
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _gateway_config(upstream: str | None = None, smol_replicas: int | None = None) -> dict:
    models = []
    if upstream:
        models.append({"name": "mock", "backend": "openai", "model": "mock", "base_url": upstream + "/v1"})
    if smol_replicas:
        models.append({"name": "smol", "backend": "transformers", "model": "smollm2-135m-instruct",
                       "torch_threads": 1, "replicas": smol_replicas, "ray_actor_options": {"num_cpus": 1}})
    return {"models": models, "server": {"access_log": False}, "ui": {"enabled": False}}


async def _load(url: str, body: dict, concurrency: int, requests: int) -> dict:
    """`requests` POSTs, `concurrency` at a time: latencies, req/s, completion tokens/s."""
    latencies: list[float] = []
    tokens = 0
    errors = 0
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(requests):
        queue.put_nowait(None)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal tokens, errors
            while not queue.empty():
                queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                    continue
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"requests": requests, "errors": errors, "wall_s": round(wall, 3), "rps": round(requests / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1e3, 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3, 2),
            "tokens_per_s": round(tokens / wall, 1)}


def _measure_overhead(url: str, quick: bool) -> dict:
    asyncio.run(_load(url, MOCK_BODY, 4, 40))  # warm-up: connections, first-request imports
    n1, n16 = (100, 400) if quick else (300, 2000)
    return {"c1": asyncio.run(_load(url, MOCK_BODY, 1, n1)), "c16": asyncio.run(_load(url, MOCK_BODY, 16, n16))}


def _serve_on_ray(config: dict, port: int) -> str:
    from slm_fusion import deploy_ray
    from slm_fusion.config import FusionConfig

    deploy_ray.run(FusionConfig.model_validate(config), host="127.0.0.1", port=port, address=None, blocking=False)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url + "/health", 300)
    return url


def run(quick: bool = False) -> dict:
    import ray
    from ray import serve

    results: dict = {"cpus": os.cpu_count()}
    mock_port = _free_port()
    upstream = f"http://127.0.0.1:{mock_port}"
    with _process([PY, "-m", "slm_fusion.backends.mock_upstream", "--port", str(mock_port)], upstream + "/v1/models"):
        with console.status("uvicorn gateway in front of the mock upstream"):
            port = _free_port()
            with tempfile.TemporaryDirectory() as tmp:
                cfg = Path(tmp) / "gw.yaml"
                cfg.write_text(json.dumps(_gateway_config(upstream)))  # JSON is YAML
                with _process([PY, "-m", "slm_fusion.cli", "serve", str(cfg), "--port", str(port), "--log-level",
                               "warning"], f"http://127.0.0.1:{port}/health"):
                    results["uvicorn"] = _measure_overhead(f"http://127.0.0.1:{port}", quick)
        with console.status("Ray: starting a local instance (2 CPUs) and Serve"):
            ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
        try:
            ray_port = _free_port()
            with console.status("Ray Serve gateway in front of the mock upstream"):
                url = _serve_on_ray(_gateway_config(upstream), ray_port)
                results["ray"] = _measure_overhead(url, quick)
            requests = 16 if quick else 32
            for replicas in (1, 2):
                with console.status(f"Ray Serve: SmolLM2-135M, {replicas} replica(s)"):
                    url = _serve_on_ray(_gateway_config(smol_replicas=replicas), ray_port)
                    asyncio.run(_load(url, SMOL_BODY, replicas, 2 * replicas))  # warm-up on every replica
                    results[f"smol_replicas_{replicas}"] = asyncio.run(_load(url, SMOL_BODY, 8, requests))
        finally:
            serve.shutdown()
            ray.shutdown()

    u, r = results["uvicorn"], results["ray"]
    one, two = results["smol_replicas_1"]["tokens_per_s"], results["smol_replicas_2"]["tokens_per_s"]
    results["summary"] = {
        "ray_added_p50_ms_c1": round(r["c1"]["p50_ms"] - u["c1"]["p50_ms"], 2),
        "ray_p50_ratio_c1": round(r["c1"]["p50_ms"] / u["c1"]["p50_ms"], 2),
        "ray_rps_ratio_c16": round(r["c16"]["rps"] / u["c16"]["rps"], 2),
        "replica_speedup": round(two / one, 2),
        "scaling_efficiency": round(two / (2 * one), 2),
    }
    # benchmarks.run's Markdown: one row per setup
    results["table"] = [
        {"setup": f"{engine}, mock upstream", "p50_ms (c1)": results[engine]["c1"]["p50_ms"],
         "req/s (c16)": results[engine]["c16"]["rps"], "tokens/s": ""} for engine in ("uvicorn", "ray")
    ] + [
        {"setup": f"ray, SmolLM2 x{n} replica(s), c8", "p50_ms (c1)": "", "req/s (c16)": "",
         "tokens/s": results[f"smol_replicas_{n}"]["tokens_per_s"]} for n in (1, 2)
    ]
    return results


def report(results: dict) -> None:
    table = Table(title="uvicorn vs Ray Serve ingress (mock upstream)")
    for col in ("engine", "c1 p50 ms", "c1 p99 ms", "c16 req/s", "errors"):
        table.add_column(col)
    for engine in ("uvicorn", "ray"):
        m = results[engine]
        table.add_row(engine, str(m["c1"]["p50_ms"]), str(m["c1"]["p99_ms"]), str(m["c16"]["rps"]),
                      str(m["c1"]["errors"] + m["c16"]["errors"]))
    console.print(table)
    table = Table(title="Ray Serve: SmolLM2-135M replicas (8 concurrent chats, 32 tokens)")
    for col in ("replicas", "tokens/s", "req/s", "p50 ms", "errors"):
        table.add_column(col)
    for n in (1, 2):
        m = results[f"smol_replicas_{n}"]
        table.add_row(str(n), str(m["tokens_per_s"]), str(m["rps"]), str(m["p50_ms"]), str(m["errors"]))
    console.print(table)
    s = results["summary"]
    console.print(f"Ray adds {s['ray_added_p50_ms_c1']} ms at p50 (x{s['ray_p50_ratio_c1']}), c16 req/s ratio "
                  f"{s['ray_rps_ratio_c16']}; 2 replicas: x{s['replica_speedup']} tokens/s, scaling efficiency "
                  f"{s['scaling_efficiency']} on {results['cpus']} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (about two minutes)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run(quick=args.quick)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    report(results)
    console.print(f"JSON: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
