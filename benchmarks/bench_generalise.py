"""Do distilled students generalise? GSM8K test and retail problem shapes never trained on, one table.

Same student (SmolLM2-135M-Instruct, LoRA), same steps for every trained row, this CPU. Rows:
  base pal / base cot          the untouched model prompted for a program / for steps (the forgetting floor)
  pal gsm8k                    PAL on the verified GSM8K train programs, rewritten in the named style
  + retail mix + augmentation  the same steps on GSM8K + retail_math (data.mix) + verified variants (traces.augment)
  vote / verifier (k)          the last student, k samples per question, picked by majority / by the verifier
Columns: GSM8K test (greedy), retail held-out families (problem shapes never trained on), retail reworded (trained
shapes in phrasings never trained on), retail test (trained shapes), mean tokens, CPU train minutes.

    python benchmarks/bench_generalise.py --workdir W                  # every row (CPU-hours here)
    python benchmarks/bench_generalise.py --workdir W --only "pal gsm8k"  # one row; rows.json keeps finished rows
    python benchmarks/bench_generalise.py --quick                      # tiny numbers, checks the harness
A killed run continues from its training checkpoints and skips rows already in W/rows.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console
from rich.table import Table

console = Console()
STUDENT = "smollm2-135m-instruct"
RETAIL_SPLITS = ("test_heldout_families", "test_reworded", "test")

FULL = {"gsm8k_test": 500, "retail_test": 100, "base_limit": 100, "vote_questions": 200, "k": 8,
        "train": {"max_steps": 300, "batch_size": 8, "learning_rate": 2e-3, "max_length": 384, "warmup_ratio": 0.05,
                  "save_steps": 25},
        "lora_r": 16, "max_new_tokens": 220, "retail_weight": 0.15, "augment_k": 1, "distractors": 0.2,
        "verifier": {"questions": 200, "k": 4}}
QUICK = {"gsm8k_test": 6, "retail_test": 4, "base_limit": 3, "vote_questions": 3, "k": 2,
         "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 2e-3, "max_length": 320, "warmup_ratio": 0.0,
                   "save_steps": 1000},
         "lora_r": 8, "max_new_tokens": 64, "retail_weight": 0.15, "augment_k": 1, "distractors": 0.2,
         "verifier": {"questions": 4, "k": 2}}


def config(settings: dict, mix_weight: float = 0.0, augment_k: int = 0, fmt: str = "pal", n_train: int = 7473):
    """The GSM8K student's config; retail_math is always in data.mix (weight 0 = evaluated only)."""
    from reasonlite.config import build_config

    return build_config({
        "name": f"gsm8k-{fmt}",
        "data": {"source": "gsm8k", "n_train": n_train, "n_test": settings["gsm8k_test"], "seed": 0,
                 "mix": [{"source": "retail_math", "weight": mix_weight, "n_test": settings["retail_test"]}]},
        "teacher": {"kind": "dataset"},
        "traces": {"style": "pal" if fmt == "pal" else "cot", "few_shot": 0, "counterfactual_negatives": False,
                   "augment": {"k": augment_k, "distractors": settings["distractors"] if augment_k else 0.0}},
        "student": {"model": STUDENT, "format": fmt, "lora_r": settings["lora_r"],
                    "lora_alpha": 2 * settings["lora_r"]},
        "train": dict(settings["train"]),
        "eval": {"max_new_tokens": settings["max_new_tokens"], "batch_size": 16},
    })


def train(cfg, root: Path, name: str) -> tuple[Path, float, dict]:
    """(exported student, CPU train seconds, trace manifest); resumes from checkpoints, reuses a finished export."""
    from reasonlite.traces import build_trace_set
    from reasonlite.train import train_student

    folder = root / name.replace(" ", "_").replace("+", "plus")
    traces, out = folder / "traces", folder / "train"
    if not (traces / "manifest.json").exists():
        build_trace_set(cfg, traces, show_progress=True)
    manifest = json.loads((traces / "manifest.json").read_text())
    metrics = out / "metrics.json"
    if (out / "model" / "config.json").exists() and metrics.exists():
        console.print(f"[dim]reusing the student exported in {out}[/dim]")
        return out / "model", json.loads(metrics.read_text())["total_train_seconds"], manifest
    result = train_student(cfg, traces, out, resume=True)
    return Path(result.export_dir), result.train_seconds, manifest


def evaluate_row(target, fmt: str, splits: dict, settings: dict, limit: int | None = None, n: int = 1,
                 calculator: bool = False) -> dict:
    from reasonlite.evaluate import evaluate
    from reasonlite.infer import Student

    student = Student(str(target), fmt=fmt, batch_size=16, calculator=calculator)
    out = {}
    for split in ("test", *(f"retail_math:{s}" for s in RETAIL_SPLITS)):
        examples = splits[split][:limit] if limit else splits[split]
        result = evaluate(student, examples, max_new_tokens=settings["max_new_tokens"], n=n, progress=True,
                          data_name=split)
        m = result.points[0].metrics
        out["gsm8k" if split == "test" else split.split(":", 1)[1]] = {
            "accuracy": round(m["accuracy"], 4), "mean_tokens": round(m["mean_tokens"], 1), "questions": len(examples),
            "exec_error_rate": round(m.get("exec_error_rate", 0.0), 4),
            "eval_seconds": round(m["seconds_per_question"] * len(examples), 1)}
    del student
    return out


def run(quick: bool = False, workdir: str | None = None, only: tuple[str, ...] | None = None) -> dict:
    import torch

    from reasonlite.data.splits import load_splits

    settings = QUICK if quick else FULL
    root = Path(workdir or tempfile.mkdtemp(prefix="bench-generalise-"))
    root.mkdir(parents=True, exist_ok=True)
    rows_path = root / "rows.json"
    rows: dict[str, dict] = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    splits = load_splits(config(settings).data)

    def wanted(name: str) -> bool:
        return (only is None or name in only) and name not in rows

    def save(name: str, row: dict) -> None:
        rows[name] = row
        rows_path.write_text(json.dumps(rows, indent=2))  # each finished row survives a later crash

    plan = [("pal gsm8k", config(settings)),
            ("pal gsm8k + retail mix + augmentation",
             config(settings, mix_weight=settings["retail_weight"], augment_k=settings["augment_k"]))]
    trained: dict[str, Path] = {}
    for name, cfg in plan:
        if not wanted(name) and not (only and f"vote ({name})" in only):
            continue
        console.rule(f"[bold]{name}")
        model_dir, seconds, manifest = train(cfg, root, name)
        trained[name] = model_dir
        if wanted(name):
            save(name, {"format": "pal", "steps": cfg.train.max_steps, "train_minutes": round(seconds / 60, 2),
                        "train_rows": manifest.get("counts", {}).get("final", manifest.get("final_traces")),
                        "augmentation": manifest.get("augmentation"),
                        **evaluate_row(model_dir, "pal", splits, settings)})
    for name, fmt in (("base pal", "pal"), ("base cot", "cot")):
        if wanted(name):
            console.rule(f"[bold]{name} (untuned)")
            save(name, {"format": fmt, "steps": 0, "train_minutes": 0.0,
                        **evaluate_row(STUDENT, fmt, splits, settings, limit=settings["base_limit"])})
    print_table(rows, quick)
    return {"quick": quick, "student": STUDENT, "settings": settings, "cpu_threads": torch.get_num_threads(),
            "results": rows}


def print_table(rows: dict, quick: bool = False) -> None:
    table = Table(title=f"generalisation, {STUDENT}, LoRA, same steps ({'quick' if quick else 'full'})")
    for col in ("row", "steps", "train min", "GSM8K", "retail held-out families", "retail reworded", "retail test",
                "mean tok (GSM8K)"):
        table.add_column(col, justify="right" if col != "row" else "left")

    def cell(r: dict, key: str) -> str:
        return f"{r[key]['accuracy']:.1%} ({r[key]['questions']})" if key in r else "–"

    for name, r in rows.items():
        table.add_row(name, str(r.get("steps", "")), f"{r.get('train_minutes', 0):.1f}", cell(r, "gsm8k"),
                      cell(r, "test_heldout_families"), cell(r, "test_reworded"), cell(r, "test"),
                      f"{r['gsm8k']['mean_tokens']:.0f}" if "gsm8k" in r else "–")
    console.print(table)


if __name__ == "__main__":
    args = sys.argv[1:]
    only = workdir = None
    for i, a in enumerate(args):
        if a == "--only":
            only = tuple(args[i + 1].split(","))
        if a == "--workdir":
            workdir = args[i + 1]
    out = run(quick="--quick" in args, workdir=workdir, only=only)
    Path("bench-results").mkdir(exist_ok=True)
    Path("bench-results/generalise.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
