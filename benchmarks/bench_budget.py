"""Trace-budget controller (inference side) and self-consistency on a CoT-distilled SmolLM2 student.

Student: SmolLM2-135M-Instruct + LoRA trained with `reasonlite.train.train_student` on retail-math gold CoT
rationales (dataset teacher); built once and cached under bench-results/budget-student/<train hash>/.
Eval set: retail-math held-out questions (`test` split: training templates, unseen questions).

Measured side by side in one run, greedy unless noted:
  plain           the controller switched off: generate until end of turn or max_new_tokens (256; quick: 96)
  early stop      stop as soon as "The answer is X." is finished, no cap
  budget B        reasoning capped at B tokens; at the cap the reasoning is closed, "The answer is" appended and
                  `answer_tokens` more generated (budget forcing)
  n=5             self-consistency, temperature 0.7, adaptive early exit (rounds of 3 then 2), no cap

The headline: the smallest-token budget whose accuracy is within 2 points of `plain`, and its token reduction.
Run: `.venv/bin/python benchmarks/bench_budget.py [--quick] [--student EXPORTED_COT_STUDENT]` (`--student` reuses a
CoT student trained elsewhere, e.g. by bench_distill.py, instead of training the cached one).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench-results" / "budget-student"
console = Console()

# sized for a 2-core CPU box (about 20 min the first time, the student is cached afterwards); the training recipe
# is bench_distill.py's (400 questions, 60 LoRA steps, lr 2e-3), so its cot student can be passed as --student
FULL = {"n_train": 400, "max_steps": 60, "n_test": 40, "budgets": [32, 48, 64, 96], "sc_questions": 20,
        "max_new_tokens": 256}
QUICK = {"n_train": 40, "max_steps": 6, "n_test": 8, "budgets": [32, 64], "sc_questions": 4, "max_new_tokens": 96}


def student_config(size: dict):
    from reasonlite.config import build_config

    return build_config({
        "name": "bench-budget-cot",
        "data": {"source": "retail_math", "n_train": size["n_train"], "n_test": size["n_test"],
                 "n_test_heldout_templates": 0, "seed": 0},
        "teacher": {"kind": "dataset"},
        "traces": {"style": "cot", "few_shot": 0, "counterfactual_negatives": False},
        "student": {"model": "smollm2-135m-instruct", "format": "cot", "lora": True, "lora_r": 16, "lora_alpha": 32},
        "train": {"max_steps": size["max_steps"], "batch_size": 8, "learning_rate": 2e-3, "max_length": 320,
                  "save_steps": 1000},
        "budget": {"answer_tokens": 12},
    })


def cot_student(cfg) -> Path:
    """The exported CoT student for `cfg`, trained once (trace set + SFT) and cached by the train-stage hash."""
    from reasonlite.config import stage_hash

    folder = CACHE / stage_hash(cfg, "train")
    model_dir = folder / "train" / "model"
    if (model_dir / "config.json").exists():
        console.print(f"[dim]cached CoT student: {model_dir}[/dim]")
        return model_dir
    from reasonlite.traces import build_trace_set
    from reasonlite.train import train_student

    build_trace_set(cfg, folder / "traces")
    return Path(train_student(cfg, folder / "traces", folder / "train").export_dir)


def _row(name: str, point, plain: dict | None) -> dict:
    m = point.metrics
    row = {"setting": name, "accuracy_%": round(100 * m["accuracy"], 1), "mean_tokens": round(m["mean_tokens"], 1),
           "p95_tokens": round(m["p95_tokens"], 1), "forced_%": round(100 * m["forced_rate"], 1),
           "mean_samples": round(m["mean_samples"], 2), "s_per_question": round(m["seconds_per_question"], 3)}
    if plain:
        row["token_reduction_%"] = round(100 * (1 - m["mean_tokens"] / plain["mean_tokens"]), 1)
        row["accuracy_delta_pts"] = round(100 * (m["accuracy"] - plain["accuracy"]), 1)
    return row


def run(quick: bool = False, student: str | None = None) -> dict:
    import torch

    from reasonlite.data.splits import load_splits
    from reasonlite.evaluate import evaluate
    from reasonlite.infer import Student
    from reasonlite.models import load_model

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    size = QUICK if quick else FULL
    cfg = student_config(size)
    t0 = time.perf_counter()
    model_dir = Path(student) if student else cot_student(cfg)
    train_s = time.perf_counter() - t0
    examples = load_splits(cfg.data)["test"][: size["n_test"]]
    model, tokenizer = load_model(model_dir)
    common = {"forcing": True, "answer_tokens": cfg.budget.answer_tokens, "batch_size": 16, "name": str(model_dir)}
    controlled = Student((model, tokenizer), fmt="cot", **common)
    uncontrolled = Student((model, tokenizer), fmt="cot", **{**common, "forcing": False}, early_stop=False)
    kw = {"max_new_tokens": size["max_new_tokens"], "progress": True, "data_name": "retail_math:test"}

    plain = evaluate(uncontrolled, examples, **kw).points[0]
    swept = evaluate(controlled, examples, budgets=[None, *size["budgets"]], **kw).points
    base = plain.metrics
    rows = [_row("plain (controller off)", plain, base), _row("early stop, no cap", swept[0], base)]
    rows += [_row(f"budget {p.budget}", p, base) for p in swept[1:]]

    sc_examples = examples[: size["sc_questions"]]
    sc1 = evaluate(controlled, sc_examples, n=1, **kw).points[0]
    sc5 = evaluate(controlled, sc_examples, n=5, temperature=0.7, early_exit=True, seed=0, **kw).points[0]
    sc_rows = [_row("n=1 greedy", sc1, None), _row("n=5 sampled, adaptive exit", sc5, None)]
    sc_rows[1]["cost_ratio_vs_n1"] = round(sc5.metrics["mean_tokens"] / max(sc1.metrics["mean_tokens"], 1e-9), 2)

    within = [p for p in swept[1:] if base["accuracy"] - p.metrics["accuracy"] <= 0.02 + 1e-9]
    best = min(within, key=lambda p: p.metrics["mean_tokens"]) if within else None
    headline = {
        "best_budget": best.budget if best else None,
        "token_reduction_vs_plain_%": round(100 * (1 - best.metrics["mean_tokens"] / base["mean_tokens"]), 1)
        if best else None,
        "token_reduction_vs_early_stop_%": round(100 * (1 - best.metrics["mean_tokens"]
                                                        / swept[0].metrics["mean_tokens"]), 1) if best else None,
        "accuracy_delta_pts": round(100 * (best.metrics["accuracy"] - base["accuracy"]), 1) if best else None,
    }
    headline["target_met"] = bool(best and headline["token_reduction_vs_plain_%"] >= 50)

    table = Table(title=f"Trace-budget controller, CoT SmolLM2 student, retail-math test ({len(examples)} questions)")
    for col in rows[0]:
        table.add_column(col, justify="right" if col != "setting" else "left")
    for r in rows:
        table.add_row(*[str(r[c]) for c in rows[0]])
    console.print(table)
    sc_table = Table(title=f"Self-consistency ({len(sc_examples)} questions, no cap)")
    for col in sc_rows[1]:
        sc_table.add_column(col, justify="right" if col != "setting" else "left")
    for r in sc_rows:
        sc_table.add_row(*[str(r.get(c, "")) for c in sc_rows[1]])
    console.print(sc_table)
    console.print(f"headline: {headline}")
    return {"quick": quick, "student": str(model_dir), "student_build_s": round(train_s, 1),
            "questions": len(examples), "answer_tokens": cfg.budget.answer_tokens, "headline": headline,
            "table": rows, "self_consistency": sc_rows}


if __name__ == "__main__":
    args = sys.argv[1:]
    run(quick="--quick" in args, student=args[args.index("--student") + 1] if "--student" in args else None)
