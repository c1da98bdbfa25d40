"""Trace-budget controller (inference and training side) and self-consistency on CoT-distilled SmolLM2 students.

Two students, both SmolLM2-135M-Instruct + LoRA trained with `reasonlite.train.train_student` on retail-math gold
CoT rationales (dataset teacher), built once and cached under bench-results/budget-student/<train hash>/:
  cot             plain CoT distillation (bench_distill.py's recipe: 400 questions, 60 steps, lr 2e-3)
  cot+budget      the same rationales with the training side of the controller on: `budget.condition_training`
                  (the prompt states the trace's length bucket) and `budget.compress` (each rationale also appears
                  in its compressed form, its equations with single-use results inlined, at that form's bucket);
                  150 steps, as it has three rows per question
Both run with the decoding-time calculator (`eval.calculator`); one row shows the cot student without it.
Eval set: retail-math held-out questions (`test` split: training templates, unseen questions).

Measured side by side in one run, greedy unless noted:
  plain           the controller switched off: generate until end of turn or max_new_tokens (256; quick: 96)
  early stop      stop as soon as "The answer is X." is finished, no cap
  budget B        reasoning capped at B tokens; at the cap the reasoning is closed, "The answer is" appended and
                  `answer_tokens` more generated (budget forcing). The cot+budget student is also told the budget
                  ("Use at most B tokens.", snapped to its largest training bucket <= B).
  n=5             self-consistency, temperature 0.7, adaptive early exit (rounds of 3 then 2), no cap

The headline: the fewest-token budget row whose accuracy is within 2 points of the cot student's plain row, and its
token reduction. Run: `.venv/bin/python benchmarks/bench_budget.py [--quick] [--student DIR] [--budget-student DIR]`
(`--student` / `--budget-student` reuse students trained elsewhere, e.g. the cot student of bench_distill.py).
"""

from __future__ import annotations

import json
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
console = Console(width=160)

# sized for a 2-core CPU box (about 45 min the first time: two students; they are cached afterwards)
FULL = {"n_train": 400, "max_steps": 60, "budget_steps": 150, "n_test": 40, "budgets": [24, 32, 40, 48, 64, 96],
        "sc_questions": 20, "max_new_tokens": 256}
QUICK = {"n_train": 40, "max_steps": 6, "budget_steps": 6, "n_test": 8, "budgets": [24, 48], "sc_questions": 4,
         "max_new_tokens": 96}
BUCKETS = [16, 24, 32, 48, 64, 96, 128, 256]  # compressed rationales fall in 24-48, full ones in 48-128


def student_config(size: dict, budget_trained: bool = False):
    from reasonlite.config import build_config

    budget = {"answer_tokens": 12}
    if budget_trained:
        budget.update(condition_training=True, compress=True, buckets=BUCKETS)
    return build_config({
        "name": "bench-budget-cot" + ("-budget" if budget_trained else ""),
        "data": {"source": "retail_math", "n_train": size["n_train"], "n_test": size["n_test"],
                 "n_test_heldout_templates": 0, "seed": 0},
        "teacher": {"kind": "dataset"},
        "traces": {"style": "cot", "few_shot": 0, "counterfactual_negatives": False},
        "student": {"model": "smollm2-135m-instruct", "format": "cot", "lora": True, "lora_r": 16, "lora_alpha": 32},
        "train": {"max_steps": size["budget_steps" if budget_trained else "max_steps"], "batch_size": 8,
                  "learning_rate": 2e-3, "max_length": 320, "save_steps": 50},
        "budget": budget,
        "eval": {"calculator": True},
    })


def _row(student: str, name: str, point, plain: dict | None) -> dict:
    m = point.metrics
    row = {"student": student, "setting": name, "accuracy_%": round(100 * m["accuracy"], 1), "mean_tokens": round(m["mean_tokens"], 1),
           "p95_tokens": round(m["p95_tokens"], 1), "forced_%": round(100 * m["forced_rate"], 1),
           "mean_samples": round(m["mean_samples"], 2), "s_per_question": round(m["seconds_per_question"], 3)}
    if plain:
        row["token_reduction_%"] = round(100 * (1 - m["mean_tokens"] / plain["mean_tokens"]), 1)
        row["accuracy_delta_pts"] = round(100 * (m["accuracy"] - plain["accuracy"]), 1)
    return row


def run(quick: bool = False, student: str | None = None, budget_student: str | None = None) -> dict:
    import torch

    from reasonlite.data.splits import load_splits
    from reasonlite.evaluate import evaluate
    from reasonlite.infer import Student
    from reasonlite.models import load_model
    from reasonlite.pipeline import train_once

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    size = QUICK if quick else FULL
    cfg, budget_cfg = student_config(size), student_config(size, budget_trained=True)
    t0 = time.perf_counter()
    cot_dir = Path(student) if student else train_once(cfg, CACHE)[0]
    budget_dir = Path(budget_student) if budget_student else train_once(budget_cfg, CACHE)[0]
    build_s = time.perf_counter() - t0
    examples = load_splits(cfg.data)["test"][: size["n_test"]]
    kw = {"max_new_tokens": size["max_new_tokens"], "progress": True, "data_name": "retail_math:test"}
    common = {"fmt": "cot", "answer_tokens": cfg.budget.answer_tokens, "batch_size": 16, "calculator": True}

    pair = load_model(cot_dir)
    controlled = Student(pair, **common, name="cot")
    uncontrolled = Student(pair, **{**common, "forcing": False}, early_stop=False, name="cot")
    no_calculator = Student(pair, **{**common, "forcing": False, "calculator": False}, early_stop=False, name="cot")
    plain = evaluate(uncontrolled, examples, **kw).points[0]
    base = plain.metrics
    rows = [_row("cot", "plain, no calculator", evaluate(no_calculator, examples, **kw).points[0], base),
            _row("cot", "plain (controller off)", plain, base)]
    swept = evaluate(controlled, examples, budgets=[None, *size["budgets"]], **kw).points
    rows += [_row("cot", "early stop, no cap", swept[0], base)]
    rows += [_row("cot", f"budget {p.budget}", p, base) for p in swept[1:]]

    trained = Student(load_model(budget_dir), **common, name="cot+budget")
    if not trained.budget_conditioned:
        raise ValueError(f"{budget_dir} is not a budget-conditioned student (reasonlite.json budget_conditioned)")
    trained_pts = evaluate(trained, examples, budgets=[None, *size["budgets"]], **kw).points
    rows += [_row("cot+budget", "no budget stated", trained_pts[0], base)]
    rows += [_row("cot+budget", f"budget {p.budget} (stated + cap)", p, base) for p in trained_pts[1:]]

    sc_examples = examples[: size["sc_questions"]]
    sc1 = evaluate(controlled, sc_examples, n=1, **kw).points[0]
    sc5 = evaluate(controlled, sc_examples, n=5, temperature=0.7, early_exit=True, seed=0, **kw).points[0]
    sc_rows = [_row("cot", "n=1 greedy", sc1, None), _row("cot", "n=5 sampled, adaptive exit", sc5, None)]
    sc_rows[1]["cost_ratio_vs_n1"] = round(sc5.metrics["mean_tokens"] / max(sc1.metrics["mean_tokens"], 1e-9), 2)

    def best_within(points) -> dict | None:
        ok = [p for p in points if base["accuracy"] - p.metrics["accuracy"] <= 0.02 + 1e-9]
        best = min(ok, key=lambda p: p.metrics["mean_tokens"]) if ok else None
        if best is None:
            return None
        return {"budget": best.budget,
                "token_reduction_vs_plain_%": round(100 * (1 - best.metrics["mean_tokens"] / base["mean_tokens"]), 1),
                "accuracy_delta_pts": round(100 * (best.metrics["accuracy"] - base["accuracy"]), 1)}

    headline = {"plain_accuracy_%": round(100 * base["accuracy"], 1), "plain_mean_tokens": round(base["mean_tokens"], 1),
                "cap_only": best_within(swept[1:]), "budget_trained": best_within(trained_pts[1:])}
    reductions = [h["token_reduction_vs_plain_%"] for h in (headline["cap_only"], headline["budget_trained"]) if h]
    headline["target_met"] = bool(reductions and max(reductions) >= 50)

    _print_table(f"Trace-budget controller, CoT SmolLM2 students, retail-math test ({len(examples)} questions)", rows)
    _print_table(f"Self-consistency, cot student with calculator ({len(sc_examples)} questions, no cap)", sc_rows)
    console.print(f"headline: {headline}")
    result = {"quick": quick, "students": {"cot": str(cot_dir), "cot+budget": str(budget_dir)},
            "student_build_s": round(build_s, 1), "questions": len(examples),
            "answer_tokens": cfg.budget.answer_tokens, "buckets": BUCKETS, "headline": headline, "table": rows,
            "self_consistency": sc_rows}
    out = ROOT / "bench-results" / ("budget-quick.json" if quick else "budget.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return result


def _print_table(title: str, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(c for r in rows for c in r))  # every row's keys, in first-seen order
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("student", "setting") else "right")
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in columns])
    console.print(table)


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


if __name__ == "__main__":
    argv = sys.argv[1:]
    run(quick="--quick" in argv, student=_arg(argv, "--student"), budget_student=_arg(argv, "--budget-student"))
