"""Sandbox throughput: persistent worker pool vs. a naive ``python -c`` subprocess per program.

Workload: distinct retail-math PAL programs (3-5 arithmetic steps, ``def solution(): ... return x``), the shape a
student model emits. Measured in one run, side by side:

* pool ``run_many`` throughput over ``n_pool`` distinct programs (parent AST check/compile cache cleared first, so
  every program pays the full check), and once more with the same programs (cache hits, as in self-consistency
  voting where samples repeat);
* pool latency of single ``run`` calls (p50/p99);
* the naive baseline: one ``python -c`` subprocess per program, two at a time (same 2 cores), no sandboxing at all.

Run: ``.venv/bin/python benchmarks/bench_sandbox.py [--quick]``.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

from rich.console import Console
from rich.table import Table

from reasonlite import sandbox as sandbox_module
from reasonlite.sandbox import Sandbox

WORKERS = 2

_TEMPLATES = [
    # (program template, number of random ints it needs)
    (
        (
            "def solution():\n"
            "    price = {0}\n    quantity = {1}\n    subtotal = price * quantity\n"
            "    discount = subtotal * {2} / 100\n    return subtotal - discount\n"
        ),
        3,
    ),
    (
        (
            "def solution():\n"
            "    apples = {0}\n    bags = {1}\n    per_bag = apples // bags\n    leftover = apples % bags\n"
            "    return per_bag + leftover\n"
        ),
        2,
    ),
    (
        (
            "def solution():\n"
            "    wage = {0}\n    hours = {1}\n    overtime = {2}\n    regular = wage * hours\n"
            "    extra = wage * 1.5 * overtime\n    return regular + extra\n"
        ),
        3,
    ),
    (
        (
            "from fractions import Fraction\n"
            "def solution():\n"
            "    total = {0}\n    spent = Fraction({1}, {2} + {1})\n    left = total - total * spent\n"
            "    return left\n"
        ),
        3,
    ),
    (
        (
            "import math\n"
            "def solution():\n"
            "    items = {0}\n    box = {1}\n    boxes = math.ceil(items / box)\n    cost = boxes * {2}\n"
            "    return cost\n"
        ),
        3,
    ),
    (
        (
            "def solution():\n"
            "    sales = [{0}, {1}, {2}]\n    total = 0\n    for s in sales:\n        total += s * 2\n"
            "    return total\n"
        ),
        3,
    ),
]


def make_programs(n: int, seed: int = 0) -> list[str]:
    """Distinct short PAL programs (distinct by their numbers)."""
    rng = random.Random(seed)
    programs = []
    for i in range(n):
        template, arity = _TEMPLATES[i % len(_TEMPLATES)]
        programs.append(template.format(*(rng.randint(2, 999) for _ in range(arity))))
    return programs


def expected_value(code: str) -> object:
    """The value a program returns when run directly (trusted: these are our own generated programs)."""
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - benchmark-generated source, not model output
    value = namespace["solution"]()
    return float(value) if isinstance(value, Fraction) else value


def _percentiles(latencies_s: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies_s)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return p50 * 1000.0, p99 * 1000.0


def bench_pool(programs: list[str], n_latency: int) -> dict:
    with Sandbox(workers=WORKERS) as box:
        box.run_many(make_programs(20, seed=999))  # workers booted and warm
        sandbox_module._prepare.cache_clear()  # every measured program pays the full AST check + compile
        start = time.perf_counter()
        results = box.run_many(programs)
        elapsed = time.perf_counter() - start
        failures = sum(not r.ok for r in results)
        mismatches = sum(r.value != expected_value(code) for r, code in zip(results, programs, strict=True))
        repeated = programs[: min(len(programs), 2000)]  # fits the check cache (LRU, 4096 sources)
        box.run_many(repeated)
        start = time.perf_counter()
        box.run_many(repeated)  # same sources again: parent-side cache hits, as when voting samples repeat
        cached_elapsed = time.perf_counter() - start
        sandbox_module._prepare.cache_clear()
        latencies = []
        for code in make_programs(n_latency, seed=1234):
            t0 = time.perf_counter()
            result = box.run(code)
            latencies.append(time.perf_counter() - t0)
            failures += not result.ok
    p50, p99 = _percentiles(latencies)
    return {
        "programs": len(programs),
        "programs_per_s": len(programs) / elapsed,
        "programs_cached": len(repeated),
        "programs_per_s_cached": len(repeated) / cached_elapsed,
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "failures": failures,
        "wrong_values": mismatches,
    }


def _run_subprocess(code: str) -> tuple[float, bool]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code + "\nprint(solution())\n"], capture_output=True, timeout=30, check=False
    )
    return time.perf_counter() - t0, proc.returncode == 0 and bool(proc.stdout.strip())


def bench_subprocess(programs: list[str]) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:  # same parallelism as the sandbox pool
        outcomes = list(pool.map(_run_subprocess, programs))
    elapsed = time.perf_counter() - start
    p50, p99 = _percentiles([latency for latency, _ in outcomes])
    return {
        "programs": len(programs),
        "programs_per_s": len(programs) / elapsed,
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "failures": sum(not ok for _, ok in outcomes),
    }


def run(quick: bool = False) -> dict:
    n_pool, n_latency, n_subprocess = (1000, 200, 30) if quick else (5000, 500, 100)
    programs = make_programs(n_pool)
    pool = bench_pool(programs, n_latency)
    baseline = bench_subprocess(programs[:n_subprocess])
    result = {
        "workers": WORKERS,
        "pool": pool,
        "subprocess_per_program": baseline,
        "throughput_ratio": pool["programs_per_s"] / baseline["programs_per_s"],
        "latency_p50_ratio": baseline["latency_p50_ms"] / pool["latency_p50_ms"],
        "target_programs_per_s": 1000,
        "meets_target": pool["programs_per_s"] >= 1000,
    }

    table = Table(title=f"Sandbox: distinct short PAL programs, {WORKERS} workers")
    for column in ("executor", "programs", "programs/s", "p50 ms", "p99 ms", "failures", "wrong values"):
        table.add_column(column, justify="right" if column != "executor" else "left")
    table.add_row("pool run_many, cold check cache", str(pool["programs"]), f"{pool['programs_per_s']:,.0f}",
                  f"{pool['latency_p50_ms']:.2f}", f"{pool['latency_p99_ms']:.2f}", str(pool["failures"]),
                  str(pool["wrong_values"]))  # fmt: skip
    table.add_row("pool run_many, cached check", str(pool["programs_cached"]), f"{pool['programs_per_s_cached']:,.0f}",
                  "", "", "", "")  # fmt: skip
    table.add_row("python -c per program", str(baseline["programs"]), f"{baseline['programs_per_s']:,.1f}",
                  f"{baseline['latency_p50_ms']:.2f}", f"{baseline['latency_p99_ms']:.2f}", str(baseline["failures"]),
                  "")  # fmt: skip
    console = Console(width=max(Console().width, 110))
    console.print(table)
    console.print(
        f"pool / subprocess throughput: [bold]{result['throughput_ratio']:.0f}x[/]; "
        f"p50 latency {result['latency_p50_ratio']:.0f}x lower; target >= 1000 programs/s: "
        f"{'met' if result['meets_target'] else 'NOT met'}"
    )
    return result


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
