"""`make bench`: run every benchmarks/bench_*.py (or the ones named), print tables, write JSON + Markdown.

    python -m benchmarks.run                 # all, full size
    python -m benchmarks.run sandbox traces  # some
    python -m benchmarks.run --quick         # small sizes, to check the harness
Results go to bench-results/results.json and bench-results/results.md (one section per benchmark).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
import traceback
from pathlib import Path

from rich.console import Console

OUT = Path("bench-results")
console = Console()


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))


def to_markdown(name: str, result: dict) -> str:
    lines = [f"## {name}", ""]
    rows = result.get("table")
    if rows:
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    else:
        lines += ["```json", json.dumps(result, indent=2, default=str)[:6000], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(discover())})")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    names = args.names or discover()
    OUT.mkdir(exist_ok=True)
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    failed = []
    for name in names:
        console.rule(f"[bold]bench {name}")
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            result = module.run(quick=args.quick)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        result["_meta"] = {"seconds": round(time.perf_counter() - t0, 1), "quick": args.quick,
                           "machine": f"{platform.machine()} {platform.node()}", "when": time.strftime("%F %T")}
        results[name] = result
        results_path.write_text(json.dumps(results, indent=2, default=str))
    md = ["# Benchmark results", "", "Machine: shared 2-core CPU VM, numbers are indicative; compare ratios.", ""]
    md += [to_markdown(n, r) for n, r in results.items()]
    (OUT / "results.md").write_text("\n".join(md))
    console.print(f"wrote {results_path} and {OUT / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
