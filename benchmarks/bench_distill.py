"""The claim ReasonLite exists for: distilled rationales (PAL) beat answer-only tuning on the same budget.

Retail-math, SmolLM2-135M-Instruct student, one trace set per rationale style from the dataset teacher (gold
programs / rationales, built by `reasonlite.traces.build_trace_set`), the same number of LoRA steps for every
student, on this CPU. For each student: accuracy on held-out questions of the training templates (`test`) and on
templates never seen in training (`test_heldout_templates`), mean generated tokens, train minutes. The untuned base
model prompted for PAL is the zero-training reference. Optional variants: step_by_step alpha, contrastive on/off.

    python benchmarks/bench_distill.py            # full (about 10 CPU-minutes of training per student)
    python benchmarks/bench_distill.py --quick    # tiny numbers, checks the harness end to end
    python benchmarks/bench_distill.py --students answer,pal
    python benchmarks/bench_distill.py --students '' --no-base --variants --only "pal +contrastive" --workdir W
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
SPLITS = ("test", "test_heldout_templates")

# The LoRA setting found to reach high PAL accuracy within a few CPU minutes (see README / report).
FULL = {"n_train": 400, "n_test": 100, "n_heldout": 100, "base_limit": 50, "train": {
    "max_steps": 60, "batch_size": 8, "learning_rate": 2e-3, "max_length": 320, "warmup_ratio": 0.05,
    "save_steps": 1000}, "lora_r": 16, "max_new_tokens": 200}
QUICK = {"n_train": 24, "n_test": 8, "n_heldout": 8, "base_limit": 4, "train": {
    "max_steps": 3, "batch_size": 4, "learning_rate": 2e-3, "max_length": 320, "warmup_ratio": 0.0,
    "save_steps": 1000}, "lora_r": 8, "max_new_tokens": 96}


def _config(settings: dict, fmt: str, extra: dict | None = None):
    from reasonlite.config import build_config

    style = "pal" if fmt == "pal" else "cot"
    data = {"source": "retail_math", "n_train": settings["n_train"], "n_test": settings["n_test"],
            "n_test_heldout_templates": settings["n_heldout"], "seed": 0}
    cfg = {"name": f"bench-{fmt}", "data": data, "teacher": {"kind": "dataset"}, "traces": {"style": style},
           "student": {"model": STUDENT, "format": fmt, "lora_r": settings["lora_r"],
                       "lora_alpha": 2 * settings["lora_r"]},
           "train": dict(settings["train"])}
    for key, value in (extra or {}).items():
        section, field = key.split(".", 1)
        cfg.setdefault(section, {})[field] = value
    return build_config(cfg)


def _evaluate(target, fmt: str, splits: dict, settings: dict, limit: int | None = None) -> dict:
    from reasonlite.evaluate import evaluate
    from reasonlite.infer import Student

    student = Student(str(target), fmt=fmt, batch_size=16)
    out = {}
    for split in SPLITS:
        examples = splits[split][:limit] if limit else splits[split]
        result = evaluate(student, examples, max_new_tokens=settings["max_new_tokens"], progress=True,
                          data_name=split)
        m = result.points[0].metrics
        out[split] = {"accuracy": round(m["accuracy"], 4), "mean_tokens": round(m["mean_tokens"], 1),
                      "questions": len(examples), "exec_error_rate": round(m.get("exec_error_rate", 0.0), 4),
                      "eval_seconds": round(m["seconds_per_question"] * len(examples), 1)}
    del student
    return out


def run(quick: bool = False, students: tuple[str, ...] = ("answer", "cot", "pal"), base: bool = True,
        variants: bool = False, workdir: str | None = None, only: tuple[str, ...] | None = None) -> dict:
    """`workdir` keeps trace sets, trained students and rows.json: a re-run with the same workdir (after a crash or a
    kill) reuses every student already exported there and only evaluates it. `only` keeps the plan rows so named."""
    import torch

    from reasonlite.data.splits import load_splits
    from reasonlite.traces import build_trace_set
    from reasonlite.train import TrainResult, train_student

    torch.manual_seed(0)
    settings = QUICK if quick else FULL
    root = Path(workdir or tempfile.mkdtemp(prefix="bench-distill-"))
    splits = load_splits(_config(settings, "pal").data)
    trace_dirs: dict[str, Path] = {}

    def traces_for(fmt: str) -> Path:
        style = "pal" if fmt == "pal" else "cot"
        if style not in trace_dirs:
            trace_dirs[style] = root / f"traces-{style}"
            if not (trace_dirs[style] / "manifest.json").exists():
                build_trace_set(_config(settings, fmt), trace_dirs[style], show_progress=False)
        return trace_dirs[style]

    rows: dict[str, dict] = {}
    plan = [(fmt, fmt, None) for fmt in students]
    if variants:
        plan += [(f"step_by_step a={a}", "step_by_step", {"train.step_by_step_alpha": a}) for a in (0.2, 0.5, 0.8)]
        c = {"contrastive.enabled": True, "contrastive.max_steps": 3 if quick else 20}
        plan += [("pal +contrastive", "pal", c)]
    if only:
        plan = [p for p in plan if p[0] in only]
    for name, fmt, extra in plan:
        cfg = _config(settings, fmt, extra)
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        train_dir = root / f"train-{name.replace(' ', '_').replace('=', '')}"
        if (train_dir / "model" / "config.json").exists() and (train_dir / "metrics.json").exists():
            m = json.loads((train_dir / "metrics.json").read_text())  # exported by an earlier run of this workdir
            result = TrainResult(train_dir / "model", m["steps"], m["total_train_seconds"], m["final_loss"])
            console.print(f"[dim]reusing the student exported in {train_dir}[/dim]")
        else:
            result = train_student(cfg, traces_for(fmt), train_dir, resume=True)  # a crashed run continues
        train_minutes = (time.perf_counter() - t0) / 60
        rows[name] = {"format": fmt, "steps": result.steps, "train_minutes": round(result.train_seconds / 60, 2),
                      "wall_minutes": round(train_minutes, 2), "final_loss": round(result.final_loss, 4),
                      **_evaluate(result.export_dir, fmt, splits, settings)}
        (root / "rows.json").write_text(json.dumps(rows, indent=2))  # each finished row survives a later crash
    if base:
        console.rule("[bold]base (untuned, PAL prompt)")
        rows["base pal (untuned)"] = {"format": "pal", "steps": 0, "train_minutes": 0.0, "final_loss": None,
                                      **_evaluate(STUDENT, "pal", splits, settings, limit=settings["base_limit"])}

    table = Table(title=f"distillation on retail-math, {STUDENT}, LoRA, same steps ({'quick' if quick else 'full'})")
    for col in ("student", "steps", "train min", "acc test", "acc held-out tpl", "mean tok (test)", "n test"):
        table.add_column(col, justify="right" if col != "student" else "left")
    for name, r in rows.items():
        table.add_row(name, str(r["steps"]), f"{r['train_minutes']:.1f}", f"{r['test']['accuracy']:.1%}",
                      f"{r['test_heldout_templates']['accuracy']:.1%}", f"{r['test']['mean_tokens']:.0f}",
                      str(r["test"]["questions"]))
    console.print(table)
    result = {"quick": quick, "student": STUDENT, "train_settings": settings["train"], "lora_r": settings["lora_r"],
              "n_train": settings["n_train"], "cpu_threads": torch.get_num_threads(), "results": rows}
    if "pal" in rows and "answer" in rows:
        gap = rows["pal"]["test"]["accuracy"] - rows["answer"]["test"]["accuracy"]
        result["pal_minus_answer_points"] = round(100 * gap, 1)
        result["targets"] = {
            "pal_test_accuracy>=0.95": rows["pal"]["test"]["accuracy"] >= 0.95,
            "pal_train_minutes<=10": rows["pal"]["train_minutes"] <= 10,
            "pal_minus_answer>=60pts": gap >= 0.60,
        }
        console.print(f"PAL - answer: {100 * gap:+.1f} points on held-out questions; targets: {result['targets']}")
    return result


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen, only, workdir = ("answer", "cot", "pal"), None, None
    for i, a in enumerate(args):
        if a == "--students":
            chosen = tuple(s for s in args[i + 1].split(",") if s)
        if a == "--only":  # e.g. --only "step_by_step a=0.2,pal +contrastive"
            only = tuple(args[i + 1].split(","))
        if a == "--workdir":
            workdir = args[i + 1]
    out = run(quick="--quick" in args, students=chosen, base="--no-base" not in args, variants="--variants" in args,
              workdir=workdir, only=only)
    print(json.dumps(out, indent=2))
