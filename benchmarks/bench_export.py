"""CPU tokens/s of a student through the gateway's llama.cpp backend (its exported GGUF) vs its transformers backend.

The same student (default SmolLM2-135M-Instruct, or `--student FOLDER`, e.g. runs/NAME/train/model) is exported
with `reasonlite.gguf_export` as f16, q8_0 and q4_k_m, then every backend answers the same chat prompts (the
student's CoT prompt, `formats.build_messages`) greedily, one request at a time, through the public Backend API of
`slm_fusion.backends` (`make_backend`, `generate`). The machine is shared, so the backends take turns prompt by
prompt: a load spike hits all of them alike. Reported per backend: completion tokens, seconds, tokens/s, the ratio
to transformers, and on how many prompts the greedy text is the same as transformers'.

    python benchmarks/bench_export.py                   # 10 prompts x 64 tokens, 2 threads
    python benchmarks/bench_export.py --quick           # 3 prompts x 16 tokens: checks the harness
    python benchmarks/bench_export.py --student runs/retail-pal/train/model --threads 1

Writes bench-results/export.json (export-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console()
OUT = Path("bench-results")
QUESTIONS = [
    "A shop sells 12 apples for $3. How much do 20 apples cost?",
    "Sara has 15 stickers and gives 4 to her friend. How many are left?",
    "A train travels 60 km in 1 hour. How far does it go in 3 hours?",
    "Tom buys 3 pens at $2 each and a notebook for $5. How much does he spend?",
    "There are 24 students split into 4 equal groups. How many are in each group?",
    "A box holds 6 eggs. How many eggs are in 9 boxes?",
    "Lisa reads 10 pages a day. How many pages does she read in a week?",
    "A shirt costs $40 and is 25% off. What is the sale price?",
    "A baker makes 48 rolls and sells 30. How many rolls are left?",
    "A bike costs $120 and a helmet $35. What do both cost together?",
]
QUANTS = ("f16", "q8_0", "q4_k_m")


def export_all(student: str, workdir: Path) -> dict[str, Path]:
    """The student's GGUF in every weight type, written once into `workdir` and reused."""
    from reasonlite.gguf_export import export_gguf
    from reasonlite.models import load_model

    paths = {q: workdir / f"student-{q}.gguf" for q in QUANTS}
    missing = [q for q, p in paths.items() if not p.exists()]
    if missing:
        model, tokenizer = load_model(student, device="cpu")
        for q in missing:
            with console.status(f"exporting {q}"):
                export_gguf(model, tokenizer, paths[q], quant=q)
    return paths


def backends(student_dir: Path, ggufs: dict[str, Path], threads: int) -> dict:
    from slm_fusion.backends.base import make_backend
    from slm_fusion.config import LlamaCppModel, TransformersModel

    out = {"transformers (fp32)": make_backend(TransformersModel(
        name="hf", backend="transformers", model=str(student_dir), torch_threads=threads, max_batch_size=1))}
    for q, path in ggufs.items():
        out[f"llama.cpp {q}"] = make_backend(LlamaCppModel(name=q, backend="llamacpp", model=str(path),
                                                           n_threads=threads, n_ctx=1024))
    return out


async def measure(named: dict, prompts: list[list[dict]], max_tokens: int) -> dict[str, dict]:
    from slm_fusion.backends.base import GenerationRequest

    for backend in named.values():
        await backend.start()
        await backend.generate(GenerationRequest(messages=prompts[0], max_tokens=4, temperature=0.0))  # warm-up
    stats = {name: {"tokens": 0, "seconds": 0.0, "texts": []} for name in named}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("prompts", total=len(prompts))
        for messages in prompts:  # backends take turns per prompt: a load spike hits all alike
            for name, backend in named.items():
                t0 = time.perf_counter()
                gen = (await backend.generate(GenerationRequest(messages=messages, max_tokens=max_tokens,
                                                                temperature=0.0)))[0]
                stats[name]["seconds"] += time.perf_counter() - t0
                stats[name]["tokens"] += gen.completion_tokens
                stats[name]["texts"].append(gen.text)
            progress.advance(task)
    for backend in named.values():
        await backend.aclose()
    return stats


def run(quick: bool = False, student: str = "smollm2-135m-instruct", threads: int = 2,
        workdir: str | Path | None = None) -> dict:
    from reasonlite.formats import build_messages
    from reasonlite.models import resolve_model_dir

    n, max_tokens = (3, 16) if quick else (len(QUESTIONS), 64)
    student_dir = resolve_model_dir(student)
    workdir = Path(workdir or OUT / "export-ggufs") / student_dir.name
    workdir.mkdir(parents=True, exist_ok=True)
    ggufs = export_all(str(student_dir), workdir)
    prompts = [build_messages(q, "cot") for q in QUESTIONS[:n]]
    stats = asyncio.run(measure(backends(student_dir, ggufs, threads), prompts, max_tokens))

    ref = stats["transformers (fp32)"]
    ref_tps = ref["tokens"] / ref["seconds"]
    rows = []
    for name, s in stats.items():
        tps = s["tokens"] / s["seconds"]
        quant = name.removeprefix("llama.cpp ")
        rows.append({"backend": name,
                     "file MiB": round(ggufs[quant].stat().st_size / 2**20) if quant in ggufs else "",
                     "tokens": s["tokens"], "seconds": round(s["seconds"], 2), "tokens/s": round(tps, 1),
                     "x transformers": round(tps / ref_tps, 2),
                     "same text": f"{sum(a == b for a, b in zip(s['texts'], ref['texts']))}/{n}"})
    table = Table(title=f"CPU greedy decode, {n} prompts x {max_tokens} tokens, batch 1, {threads} threads")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)
    result = {"student": str(student_dir), "prompts": n, "max_tokens": max_tokens, "threads": threads,
              "table": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / f"export{'-quick' if quick else ''}.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 prompts x 16 tokens")
    parser.add_argument("--student", default="smollm2-135m-instruct", help="alias or exported student folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads = llama.cpp threads")
    parser.add_argument("--workdir", default=None, help="where the GGUFs are cached (default bench-results/)")
    args = parser.parse_args()
    run(quick=args.quick, student=args.student, threads=args.threads, workdir=args.workdir)


if __name__ == "__main__":
    main()
