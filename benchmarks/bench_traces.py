"""Teacher-side throughput and cache speed, against the scripted local OpenAI-compatible server (tests/teacher_server.py).

Measured in one run, side by side:
* throughput of the `openai` teacher at concurrency 16 against a server with a fixed 50 ms latency, vs the ideal
  16 / 0.05 s = 320 requests/s (target: >= 80 % of ideal);
* a trace build of `n_questions` x k=8 (CoT, dataset questions, scripted gold replies): cold (every sample from the
  server) and fully cached re-run (zero teacher calls; target < 5 s for 1,000 x 8), plus the teacher stage alone.
The server runs in its own process so client and server do not share one GIL.

Run: `.venv/bin/python benchmarks/bench_traces.py [--quick]`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LATENCY_S = 0.05
CONCURRENCY = 16


def _start_server(script_path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "teacher_server.py"), "--port", str(port),
                             "--latency", str(LATENCY_S), "--script", str(script_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("teacher_server did not start")


def _throughput(base_url: str, n_requests: int, transport: str = "aiohttp") -> dict:
    from reasonlite.config import TeacherConfig
    from reasonlite.teachers import TeacherPrompt, make_teacher

    cfg = TeacherConfig(kind="openai", model="teacher-1", base_url=base_url, concurrency=CONCURRENCY, max_retries=0,
                        api_key_env="RL_BENCH_UNSET_KEY", transport=transport)
    prompts = [TeacherPrompt([{"role": "user", "content": f"throughput question {i}"}]) for i in range(n_requests)]

    async def go():
        teacher = make_teacher(cfg)
        try:
            await teacher.complete(prompts[:CONCURRENCY], [[0]] * CONCURRENCY)  # warm the connection pool
            start = time.perf_counter()
            out = await teacher.complete(prompts, [[0]] * n_requests)
            return time.perf_counter() - start, out
        finally:
            await teacher.client.close()

    from reasonlite.traces.build import _run_async

    seconds, out = _run_async(go())  # the same event loop the build uses
    assert all(row[0].error is None for row in out)
    rps = n_requests / seconds
    ideal = CONCURRENCY / LATENCY_S
    return {"requests": n_requests, "seconds": round(seconds, 3), "req_per_s": round(rps, 1),
            "ideal_req_per_s": ideal, "fraction_of_ideal": round(rps / ideal, 3)}


def run(quick: bool = False) -> dict:
    from teacher_server import free_port

    from reasonlite.config import build_config
    from reasonlite.data.splits import load_splits
    from reasonlite.teachers import CompletionCache, TeacherPrompt, complete_cached, make_teacher
    from reasonlite.traces import build_trace_set
    from reasonlite.traces.build import default_cache_path, load_train_examples
    from reasonlite.traces.prompts import pick_exemplars, teacher_messages

    n_questions, k = (200, 8) if quick else (1000, 8)
    n_requests = 640 if quick else 3200
    console = Console()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = {"n_train": n_questions}
        from reasonlite.config import DataConfig

        examples = load_splits(DataConfig(**data))["train"]
        (tmp / "script.json").write_text(json.dumps({ex.question: [ex.rationale] for ex in examples}))
        port = free_port()
        server = _start_server(tmp / "script.json", port)
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            tput = _throughput(base_url, n_requests)  # the default transport (aiohttp)
            tput_httpx = _throughput(base_url, n_requests, transport="httpx")  # side by side, same run
            cfg = build_config({"runs_dir": str(tmp / "runs"), "data": data,
                                "teacher": {"kind": "openai", "model": "teacher-1", "base_url": base_url,
                                            "concurrency": CONCURRENCY, "api_key_env": "RL_BENCH_UNSET_KEY"},
                                "traces": {"style": "cot", "self_consistency": {"k": k}},
                                "student": {"model": "tiny-random-llama", "format": "cot"}})
            quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the run)
            t0 = time.perf_counter()
            cold = build_trace_set(cfg, tmp / "cold", show_progress=False, console=quiet)
            cold_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = build_trace_set(cfg, tmp / "warm", show_progress=False, console=quiet)
            warm_s = time.perf_counter() - t0

            # the teacher stage alone, fully cached
            exemplars = pick_exemplars(cfg.traces.few_shot, "cot")
            prompts = [TeacherPrompt(teacher_messages(ex.question, "cot", exemplars), ex)
                       for ex in load_train_examples(cfg)]
            cache = CompletionCache(default_cache_path(cfg))
            teacher = make_teacher(cfg.teacher, style="cot")
            t0 = time.perf_counter()
            _, stats = asyncio.run(complete_cached(teacher, cache, prompts, k))
            stage_s = time.perf_counter() - t0
            cache.close()
        finally:
            server.kill()
            server.wait()

    result = {
        "throughput": tput,
        "throughput_httpx": tput_httpx,
        "build": {"questions": n_questions, "k": k, "samples": n_questions * k,
                  "cold_seconds": round(cold_s, 2), "cold_calls": cold.manifest["cache"]["calls"],
                  "cached_rerun_seconds": round(warm_s, 2), "cached_rerun_calls": warm.manifest["cache"]["calls"],
                  "cached_rerun_hits": warm.manifest["cache"]["hits"],
                  "cached_teacher_stage_seconds": round(stage_s, 3), "cached_teacher_stage_hits": stats.hits,
                  "speedup_cached_vs_cold": round(cold_s / warm_s, 1)},
        "targets": {"throughput_fraction_of_ideal>=0.8": tput["fraction_of_ideal"] >= 0.8,
                    "cached_rerun_1000x8_under_5s": (warm_s < 5.0) if not quick else None},
    }
    result["table"] = [
        {"measure": f"openai teacher, concurrency {CONCURRENCY}, 50 ms server", "value": f"{tput['req_per_s']} req/s",
         "reference": f"ideal {tput['ideal_req_per_s']:.0f} req/s ({tput['fraction_of_ideal']:.0%})"},
        {"measure": "  same, transport httpx (openai SDK default)", "value": f"{tput_httpx['req_per_s']} req/s",
         "reference": f"{tput_httpx['fraction_of_ideal']:.0%} of ideal; aiohttp is "
                      f"{tput['req_per_s'] / tput_httpx['req_per_s']:.2f}x"},
        {"measure": f"build {n_questions} x k={k}, cold", "value": f"{cold_s:.2f} s",
         "reference": f"{cold.manifest['cache']['calls']} teacher calls"},
        {"measure": f"build {n_questions} x k={k}, fully cached re-run", "value": f"{warm_s:.2f} s",
         "reference": f"0 calls, {warm.manifest['cache']['hits']} hits; {cold_s / warm_s:.1f}x faster than cold"},
        {"measure": "teacher stage only, fully cached", "value": f"{stage_s:.3f} s",
         "reference": f"{stats.hits} cache hits"},
    ]
    table = Table(title="trace generation")
    for col in ("measure", "value", "reference"):
        table.add_column(col)
    for row in result["table"]:
        table.add_row(*row.values())
    console.print(table)
    return result


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
