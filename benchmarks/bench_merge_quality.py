"""Does a merged model keep both specialists' skills? Two SmolLM2-135M students, every merge method, both tasks.

Specialists (LoRA r16, 60 steps, batch 8, lr 2e-3, dataset teacher — bench_distill.py's recipe), each trained once
and cached under bench-results/merge-specialists/<train hash>/ (or passed in with --pal / --cot):
  retail-pal   retail-math, PAL format (writes a `solution()` program; the sandbox runs it)
  gsm8k-cot    GSM8K, chain-of-thought format ("... The answer is X.")
Every registered merge method combines them against the base SmolLM2-135M-Instruct with one fixed setting (no
tuning): linear 0.5/0.5, slerp t=0.5, task_arithmetic / ties / dare_* weight 1.0 each (density 0.6 for the trimming
methods). Each model — base, both specialists, every merge — is scored on both task sets (retail-math held-out questions
of the training templates in PAL format; the first GSM8K test questions in CoT format with a reasoning cap and the
decoding-time calculator), greedy.
Merge time is measured here in-process; peak RSS per method is bench_merging.py's job (fresh subprocesses).

Run: `.venv/bin/python benchmarks/bench_merge_quality.py [--quick] [--pal DIR] [--cot DIR]`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench-results" / "merge-specialists"
OUT = ROOT / "bench-results" / "merge-quality"
BASE = "smollm2-135m-instruct"
console = Console(width=150)

FULL = {"n_train": 400, "max_steps": 60, "batch_size": 8, "n_eval": 40, "cot_budget": 160, "lora_r": 16,
        "methods": ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]}
QUICK = {"n_train": 16, "max_steps": 2, "batch_size": 4, "n_eval": 4, "cot_budget": 32, "lora_r": 4,
         "methods": ["linear", "ties"]}
# One setting per method, the usual starting point (not tuned to these students).
METHOD_PARAMS = {
    "linear": ({"weight": 0.5}, {}),
    "slerp": ({}, {"t": 0.5}),
    "task_arithmetic": ({"weight": 1.0}, {}),
    "ties": ({"weight": 1.0, "density": 0.6}, {"normalize": True}),
    "dare_linear": ({"weight": 1.0, "density": 0.6}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.6}, {"normalize": True}),
}


def specialist_config(task: str, size: dict):
    from reasonlite.config import build_config

    source, fmt = {"retail-pal": ("retail_math", "pal"), "gsm8k-cot": ("gsm8k", "cot")}[task]
    return build_config({
        "name": f"merge-{task}",
        "data": {"source": source, "n_train": size["n_train"], "n_test": size["n_eval"],
                 "n_test_heldout_templates": 0, "seed": 0},
        "teacher": {"kind": "dataset"},
        "traces": {"style": fmt, "few_shot": 0, "counterfactual_negatives": False},
        "student": {"model": BASE, "format": fmt, "lora": True, "lora_r": size["lora_r"],
                    "lora_alpha": 2 * size["lora_r"]},
        "train": {"max_steps": size["max_steps"], "batch_size": size["batch_size"], "learning_rate": 2e-3,
                  "max_length": 320, "warmup_ratio": 0.05, "save_steps": 1000},
    })


def merge_config(method: str, pal: Path, cot: Path, seed: int = 0):
    from slm_fusion.merging.config import MergeConfig

    per_model, global_params = METHOD_PARAMS[method]
    return MergeConfig.model_validate({
        "merge_method": method, "base_model": None if method in ("linear", "slerp") else BASE,
        "models": [{"model": str(pal), "parameters": per_model}, {"model": str(cot), "parameters": per_model}],
        "parameters": global_params, "dtype": "float32", "tokenizer_source": "0", "seed": seed,
    })


def _score(model: str, fmt: str, examples, budget: int | None, name: str) -> dict:
    from reasonlite.evaluate import evaluate
    from reasonlite.infer import Student

    student = Student(model, fmt=fmt, batch_size=16, name=name, calculator=fmt == "cot")
    m = evaluate(student, examples, budgets=[budget], max_new_tokens=200, data_name=name).points[0].metrics
    del student
    return {"accuracy": round(m["accuracy"], 4), "mean_tokens": round(m["mean_tokens"], 1),
            "exec_error_rate": round(m.get("exec_error_rate", 0.0), 4)}


def run(quick: bool = False, pal: str | None = None, cot: str | None = None) -> dict:
    import torch

    from reasonlite.data.splits import load_splits
    from reasonlite.pipeline import train_once
    from slm_fusion.merging.driver import run_merge

    torch.manual_seed(0)
    size = QUICK if quick else FULL
    OUT.mkdir(parents=True, exist_ok=True)
    pal_cfg, cot_cfg = specialist_config("retail-pal", size), specialist_config("gsm8k-cot", size)
    train_s: dict[str, float] = {}
    pal_dir, train_s["retail-pal"] = (Path(pal), 0.0) if pal else train_once(pal_cfg, CACHE)
    cot_dir, train_s["gsm8k-cot"] = (Path(cot), 0.0) if cot else train_once(cot_cfg, CACHE)
    tasks = {  # task -> (format, examples, reasoning cap)
        "retail-math PAL": ("pal", load_splits(pal_cfg.data)["test"][: size["n_eval"]], None),
        "GSM8K CoT": ("cot", load_splits(cot_cfg.data)["test"][: size["n_eval"]], size["cot_budget"]),
    }
    models: dict[str, dict] = {"base (untuned)": {"path": BASE}, "specialist retail-pal": {"path": str(pal_dir)},
                               "specialist gsm8k-cot": {"path": str(cot_dir)}}
    for method in size["methods"]:
        out = OUT / f"merged-{method}"
        t0 = time.perf_counter()
        run_merge(merge_config(method, pal_dir, cot_dir), out, show_progress=False)
        models[f"merged {method}"] = {"path": str(out), "merge_seconds": round(time.perf_counter() - t0, 1)}

    for name, info in models.items():
        console.rule(f"[bold]{name}")
        for task, (fmt, examples, budget) in tasks.items():
            info[task] = _score(info["path"], fmt, examples, budget, f"{name} / {task}")

    table = Table(title=f"merged vs specialists, SmolLM2-135M, {size['n_eval']} questions per task "
                        f"({'quick' if quick else 'full'})")
    cols = ["model", "retail-math PAL acc", "GSM8K CoT acc", "mean of both", "tokens (PAL / CoT)", "merge s"]
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = []
    for name, info in models.items():
        a, b = info["retail-math PAL"], info["GSM8K CoT"]
        row = {"model": name, "retail_pal_acc": a["accuracy"], "gsm8k_cot_acc": b["accuracy"],
               "mean_acc": round((a["accuracy"] + b["accuracy"]) / 2, 4),
               "tokens": f"{a['mean_tokens']:.0f} / {b['mean_tokens']:.0f}",
               "merge_s": info.get("merge_seconds", "")}
        rows.append(row)
        table.add_row(name, f"{a['accuracy']:.1%}", f"{b['accuracy']:.1%}", f"{row['mean_acc']:.1%}", row["tokens"],
                      str(row["merge_s"]))
    console.print(table)
    result = {"quick": quick, "base": BASE, "specialists": {"retail-pal": str(pal_dir), "gsm8k-cot": str(cot_dir)},
              "specialist_train_seconds": train_s, "method_params": {m: METHOD_PARAMS[m] for m in size["methods"]},
              "n_eval": size["n_eval"], "cot_budget": size["cot_budget"], "models": models, "table": rows}
    (OUT / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    args = sys.argv[1:]

    def opt(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args else None

    run(quick="--quick" in args, pal=opt("--pal"), cot=opt("--cot"))
