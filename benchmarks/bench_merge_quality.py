"""Does a merge keep two real skills? Two SmolLM2-135M PAL specialists, every method at its default and tuned.

Specialists (LoRA adapters on SmolLM2-135M-Instruct, PAL format: each writes a `solution()` program the sandbox runs):
  retail   retail word problems (`data.source: retail_math`), 1,000 questions, 120 steps
  gsm8k    GSM8K train programs, 7,182 verified questions, 200 steps
each trained once and cached under bench-results/merge-specialists/<train hash>/ (or given with --retail/--gsm8k as
adapter folders, e.g. a run's last checkpoint). The old version of this benchmark merged the PAL student with a GSM8K
CoT student that scored 0%: it measured interference with noise, not a merge of two skills; this one uses two
specialists that each have a skill the other lacks.

Rows: the base model, each specialist, every merge method at one default setting (linear 0.5/0.5, task_arithmetic
1.0 each, ties and dare_ties weight 1.0 / density 0.6), and the setting `slm-fusion merge-tune` picks on the tasks'
*dev* questions (never test). Each row is scored on both test sets (greedy), and each task's accuracy is also given
normalised by its specialist's. Then `merge-eval --compare-routing`'s table for the tuned merge: merged vs the
specialists behind the semantic router (adapters on one base / separate models), resident memory and tokens/s.

Run: `.venv/bin/python benchmarks/bench_merge_quality.py [--quick] [--retail ADAPTER] [--gsm8k ADAPTER]
[--trials N]`; results in bench-results/merge-quality/ (results.json, table.md, the tune study, compare_routing.md).
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
console = Console(width=160)

FULL = {"retail": {"n_train": 1000, "max_steps": 120}, "gsm8k": {"n_train": 7473, "max_steps": 200},
        "batch_size": 8, "lora_r": 16, "retail_per_split": 15, "gsm8k_eval": 60, "trials": 6, "dev_limit": 20,
        "methods": ["linear", "task_arithmetic", "ties"]}
QUICK = {"retail": {"n_train": 16, "max_steps": 2}, "gsm8k": {"n_train": 16, "max_steps": 2},
         "batch_size": 4, "lora_r": 4, "retail_per_split": 2, "gsm8k_eval": 4, "trials": 2, "dev_limit": 3,
         "methods": ["linear", "ties"]}
# One setting per method, the usual starting point (not tuned to these students).
METHOD_PARAMS = {
    "linear": ({"weight": 0.5}, {}),
    "task_arithmetic": ({"weight": 1.0}, {}),
    "ties": ({"weight": 1.0, "density": 0.6}, {"normalize": True}),
    "dare_linear": ({"weight": 1.0, "density": 0.6}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.6}, {"normalize": True}),
}
TASKS = ("retail", "gsm8k")


def specialist_config(task: str, size: dict):
    from reasonlite.config import build_config

    source = {"retail": "retail_math", "gsm8k": "gsm8k"}[task]
    return build_config({
        "name": f"merge-{task}",
        "data": {"source": source, "n_train": size[task]["n_train"], "n_test": 1, "n_test_heldout_families": 1,
                 "n_test_reworded": 1, "seed": 0},
        "teacher": {"kind": "dataset"},
        "traces": {"style": "pal", "few_shot": 0, "counterfactual_negatives": False},
        "student": {"model": BASE, "format": "pal", "lora": True, "lora_r": size["lora_r"],
                    "lora_alpha": 2 * size["lora_r"]},
        "train": {"max_steps": size[task]["max_steps"], "batch_size": size["batch_size"], "learning_rate": 2e-3,
                  "max_length": 384, "warmup_ratio": 0.05, "save_steps": 20},
    })


def specialist_adapter(task: str, size: dict) -> Path:
    """Train (once, cached) and return the adapter: the train stage's last checkpoint holds it."""
    from reasonlite.pipeline import train_once
    from reasonlite.train.sft import last_checkpoint

    model_dir, _ = train_once(specialist_config(task, size), CACHE)
    ckpt = last_checkpoint(model_dir.parent / "checkpoints")
    if ckpt is None:
        raise SystemExit(f"{model_dir.parent}/checkpoints: no checkpoint with the adapter; pass --{task} ADAPTER")
    return Path(ckpt)


def merge_yaml(method: str, adapters: dict[str, Path], size: dict) -> dict:
    per_model, global_params = METHOD_PARAMS[method]
    return {"merge_method": method, "base_model": None if method == "linear" else BASE,
            "models": [{"model": str(adapters[t]), "parameters": per_model, "eval": task_eval(t, size)}
                       for t in TASKS],
            "parameters": global_params, "dtype": "float32", "tokenizer_source": "0" if method == "linear" else "base",
            "seed": 0}


def task_eval(task: str, size: dict) -> dict:
    return {"data": "retail_math" if task == "retail" else "gsm8k", "format": "pal",
            "limit": size["retail_per_split"] if task == "retail" else size["gsm8k_eval"]}


def _score(model: str, task: str, examples, name: str):
    from reasonlite.evaluate import evaluate
    from reasonlite.infer import Student

    student = Student(model, fmt="pal", batch_size=16, name=name)
    result = evaluate(student, examples, budgets=[None], max_new_tokens=256, data_name=task)
    del student
    return result


def run(quick: bool = False, retail: str | None = None, gsm8k: str | None = None, trials: int | None = None) -> dict:
    import torch
    import yaml

    from reasonlite.evaluate import load_eval_data
    from slm_fusion.merging.compare import compare_routing
    from slm_fusion.merging.config import MergeConfig
    from slm_fusion.merging.driver import run_merge
    from slm_fusion.merging.tune import MergeSpace, merge_tune

    torch.manual_seed(0)
    size = QUICK if quick else FULL
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    adapters = {"retail": Path(retail) if retail else specialist_adapter("retail", size),
                "gsm8k": Path(gsm8k) if gsm8k else specialist_adapter("gsm8k", size)}
    examples = {"retail": load_eval_data("retail_math", limit=size["retail_per_split"]),
                "gsm8k": load_eval_data("gsm8k", limit=size["gsm8k_eval"])}

    models: dict[str, dict] = {"base (untuned)": {"path": BASE},
                               "specialist retail": {"path": str(adapters["retail"])},
                               "specialist gsm8k": {"path": str(adapters["gsm8k"])}}
    for method in size["methods"]:
        out = OUT / f"merged-{method}"
        t0 = time.perf_counter()
        run_merge(MergeConfig.model_validate(merge_yaml(method, adapters, size)), out, show_progress=False)
        models[f"{method} (default)"] = {"path": str(out), "merge_seconds": round(time.perf_counter() - t0, 1)}

    # merge-tune on the dev questions; the study resumes if this benchmark is run again
    tune_cfg = MergeConfig.model_validate(merge_yaml("ties", adapters, size))
    space = MergeSpace.model_validate({"methods": ["task_arithmetic", "ties", "dare_ties"], "gradient": False,
                                       "trials": trials or size["trials"], "dev_limit": size["dev_limit"]})
    t0 = time.perf_counter()
    summary = merge_tune(tune_cfg, space, OUT / "tune", trials or size["trials"])
    tune_seconds = round(time.perf_counter() - t0, 1)
    best = yaml.safe_load(Path(summary["best_yaml"]).read_text())
    tuned_dir = OUT / "merged-tuned"
    run_merge(MergeConfig.model_validate(best), tuned_dir, show_progress=False)
    models[f"tuned: {best['merge_method']} (trial {summary['best']})"] = {"path": str(tuned_dir), "tuned": True}

    results = {}
    for name, info in models.items():
        console.rule(f"[bold]{name}")
        results[name] = {t: _score(info["path"], t, examples[t], f"{name} / {t}") for t in TASKS}
        info.update({t: round(results[name][t].accuracy, 4) for t in TASKS})
        info["mean_tokens"] = {t: round(results[name][t].points[0].metrics["mean_tokens"], 1) for t in TASKS}
        info["retail_by_split"] = {k: round(v["accuracy"], 4) for k, v in
                                   results[name]["retail"].points[0].breakdown.get("split", {}).items()}
    spec = {t: models[f"specialist {t}"][t] for t in TASKS}

    table = Table(title=f"two-skill merge, SmolLM2-135M PAL specialists ({'quick' if quick else 'full'}): "
                        f"{len(examples['retail'])} retail + {len(examples['gsm8k'])} GSM8K test questions")
    cols = ["model", "retail acc", "retail norm.", "GSM8K acc", "GSM8K norm.", "worst norm.", "merge s"]
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = []
    for name, info in models.items():
        norm = {t: info[t] / spec[t] if spec[t] else None for t in TASKS}
        worst = min(v for v in norm.values() if v is not None) if any(v is not None for v in norm.values()) else None
        row = {"model": name, **{f"{t}_acc": info[t] for t in TASKS}, **{f"{t}_norm": norm[t] for t in TASKS},
               "worst_norm": worst, "merge_s": info.get("merge_seconds", "")}
        rows.append(row)
        table.add_row(name, f"{info['retail']:.1%}", _n(norm["retail"]), f"{info['gsm8k']:.1%}", _n(norm["gsm8k"]),
                      _n(worst), str(row["merge_s"]))
    console.print(table)

    tuned_name = next(n for n, i in models.items() if i.get("tuned"))
    tasks = [(f"{t} (pal)", "pal", examples[t], results[f"specialist {t}"][t], results[tuned_name][t]) for t in TASKS]
    comparison = compare_routing(MergeConfig.model_validate(best), tuned_dir, tasks, OUT, dev_limit=size["dev_limit"])

    lines = ["| model | retail | retail norm. | GSM8K | GSM8K norm. | worst norm. |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['retail_acc']:.1%} | {_n(r['retail_norm'])} | {r['gsm8k_acc']:.1%} | "
              f"{_n(r['gsm8k_norm'])} | {_n(r['worst_norm'])} |" for r in rows]
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    result = {"quick": quick, "base": BASE, "specialists": {t: str(p) for t, p in adapters.items()},
              "method_params": {m: METHOD_PARAMS[m] for m in size["methods"]}, "questions":
              {t: len(examples[t]) for t in TASKS}, "tune": {**summary, "seconds": tune_seconds},
              "models": models, "table": rows, "compare_routing": json.loads((OUT / "compare_routing.json").read_text()),
              "recommendation": comparison.recommendation, "total_minutes": round((time.perf_counter() - t_start) / 60,
                                                                                  1)}
    (OUT / "results.json").write_text(json.dumps(result, indent=2, default=str))
    console.print(f"results: {OUT / 'results.json'}, table: {OUT / 'table.md'}")
    return result


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    args = sys.argv[1:]

    def opt(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args else None

    run(quick="--quick" in args, retail=opt("--retail"), gsm8k=opt("--gsm8k"),
        trials=int(opt("--trials")) if opt("--trials") else None)
