"""What the shared-state features cost the gateway: each row is one feature on vs off, same mock upstream, same
pinned core, measured in alternation with the order swapped every round (as `bench_gateway.bench_against`).

Each side reports req/s at concurrency 32, p50 at concurrency 1, and the gateway process's own CPU time per request
during the concurrency-32 run (from /proc: steadier than req/s on a box shared with other work).

Rows (one function each, listed in ROWS; add a row by writing a function that returns the same shape):
  ledger  database keys with a budget (SQLite, a budget that is checked but never reached) and the usage ledger, vs a
          static key: req/s at concurrency 32, p50 at concurrency 1 (target: at most 5% fewer req/s);
  otel    OpenTelemetry on (spans exported over OTLP/HTTP to the mock upstream's /v1/traces sink) vs off (target:
          at most 5% fewer req/s);
  otel_sampled  the same with `tracing.sample_ratio: 0.1` (one new trace in ten recorded).

    python -m benchmarks.bench_scale [--quick] [ledger otel otel_sampled]
Writes bench-results/scale/results.json and prints a table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.bench_gateway import BENCH_KEY, _mock_upstream, _our_gateway, _wrk

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results" / "scale"
console = Console()


def _gateway_config(upstream: str, **sections) -> dict:
    return {"server": {"access_log": False, "api_keys": [BENCH_KEY]},
            "models": [{"name": "mock", "backend": "openai", "model": "mock", "base_url": upstream + "/v1",
                        "max_concurrency": 256, "max_queue": 1024}], **sections}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): the gateway's own work, whatever else the box runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(url: str, seconds: float, key: str, pid: int) -> dict:
    warm = _wrk(url, 4, 1, False, key=key)  # warm-up: connections, caches, lazy imports
    c1 = _wrk(url, 1, seconds, False, key=key)
    cpu = _cpu_seconds(pid)
    c32 = _wrk(url, 32, seconds, False, key=key)
    cpu = _cpu_seconds(pid) - cpu
    return {"c1_p50_ms": c1["p50_ms"], "c32_rps": c32["rps"], "cpu_us_per_req": cpu / max(c32["requests"], 1) * 1e6,
            "requests": warm["requests"] + c1["requests"] + c32["requests"],
            "errors": warm["errors"] + c1["errors"] + c32["errors"]}


def _ab(name: str, off: tuple[dict, str], on: tuple[dict, str], rounds: int, seconds: float,
        after_on: Callable[[dict], dict] | None = None) -> dict:
    """`off` and `on`: (gateway config, bearer key); rounds alternate which goes first."""
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(rounds):
        order = (("off", off), ("on", on))
        for label, (config, key) in (order if i % 2 == 0 else order[::-1]):
            with _our_gateway(config, name=f"scale-{name}-{label}") as (url, proc):
                console.print(f"[cyan]{name} round {i + 1}/{rounds}: {label}[/cyan]")
                runs[label].append(_measure(url, seconds, key, proc.pid))
    out: dict = {"rounds": rounds, "seconds": seconds, "runs": runs}
    for metric in ("c32_rps", "c1_p50_ms", "cpu_us_per_req"):
        a = statistics.median(r[metric] for r in runs["off"])
        b = statistics.median(r[metric] for r in runs["on"])
        out[metric] = {"off": a, "on": b, "on_over_off": b / a}
    out["rps_cost"] = 1 - out["c32_rps"]["on_over_off"]
    out["errors"] = sum(r["errors"] for rs in runs.values() for r in rs)
    if after_on:
        out.update(after_on(runs))
    return out


def row_ledger(upstream: str, rounds: int, seconds: float) -> dict:
    from slm_fusion.keys import open_store

    OUT.mkdir(parents=True, exist_ok=True)
    db = OUT / "keys.db"
    for leftover in OUT.glob("keys.db*"):
        leftover.unlink()
    store = open_store(f"sqlite:///{db}")
    _, secret = store.create_key("bench", 86400, 10**15, 10**15, None)  # checked on every request, never reached
    on = _gateway_config(upstream, keys={"url": f"sqlite:///{db}", "flush_interval_s": 1.0})

    def ledger_rows(runs: dict) -> dict:  # each gateway flushes on shutdown: every answered request has its row
        rows = len(store.rows())
        answered = sum(r["requests"] for r in runs["on"])
        return {"ledger_rows": rows, "requests_answered_with_key": answered}

    try:
        return _ab("ledger", (_gateway_config(upstream), BENCH_KEY), (on, secret), rounds, seconds, ledger_rows)
    finally:
        store.close()


def row_otel(upstream: str, rounds: int, seconds: float) -> dict:
    on = _gateway_config(upstream, tracing={"enabled": True, "otlp_endpoint": upstream + "/v1/traces"})
    return _ab("otel", (_gateway_config(upstream), BENCH_KEY), (on, BENCH_KEY), rounds, seconds)


def row_otel_sampled(upstream: str, rounds: int, seconds: float) -> dict:
    on = _gateway_config(upstream, tracing={"enabled": True, "otlp_endpoint": upstream + "/v1/traces",
                                            "sample_ratio": 0.1})
    return _ab("otel_sampled", (_gateway_config(upstream), BENCH_KEY), (on, BENCH_KEY), rounds, seconds)


ROWS: dict[str, Callable[[str, int, float], dict]] = {"ledger": row_ledger, "otel": row_otel,
                                                      "otel_sampled": row_otel_sampled}


def run(quick: bool = False, names: list[str] | None = None) -> dict:
    rounds, seconds = (2, 2) if quick else (4, 6)
    results: dict = {"quick": quick, "rows": {}}
    with _mock_upstream() as upstream:
        for name in names or list(ROWS):
            try:
                results["rows"][name] = ROWS[name](upstream, rounds, seconds)
            except Exception as e:  # noqa: BLE001 - one failing row must not hide the others' numbers
                console.print(f"[red]{name} failed: {type(e).__name__}: {e}[/red]")
                results["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
    table = Table(title=f"feature on vs off (median of {rounds} rounds x {seconds}s, order swapped each round)")
    for col in ("row", "req/s off", "req/s on", "on/off", "cost", "CPU us/req off", "CPU us/req on", "CPU on/off",
                "p50 ms off", "p50 ms on", "errors"):
        table.add_column(col)
    results["table"] = []
    for name, r in results["rows"].items():
        if "error" in r:
            table.add_row(name, r["error"], *[""] * 9)
            continue
        row = {"row": name, "rps_off": round(r["c32_rps"]["off"]), "rps_on": round(r["c32_rps"]["on"]),
               "on_over_off": round(r["c32_rps"]["on_over_off"], 3), "cost": f"{r['rps_cost']:.1%}",
               "cpu_us_off": round(r["cpu_us_per_req"]["off"]), "cpu_us_on": round(r["cpu_us_per_req"]["on"]),
               "cpu_on_over_off": round(r["cpu_us_per_req"]["on_over_off"], 3),
               "p50_ms_off": round(r["c1_p50_ms"]["off"], 3), "p50_ms_on": round(r["c1_p50_ms"]["on"], 3),
               "errors": r["errors"]}
        results["table"].append(row)
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    if "ledger" in results["rows"] and "ledger_rows" in results["rows"]["ledger"]:
        r = results["rows"]["ledger"]
        console.print(f"ledger: {r['ledger_rows']} rows written for {r['requests_answered_with_key']} requests "
                      "answered with the database key")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("results-quick.json" if quick else "results.json")).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    unknown = [a for a in args if a not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {unknown}: pick from {list(ROWS)}")
    run(quick="--quick" in sys.argv, names=args or None)
