"""Do distilled students generalise? GSM8K test and retail problem shapes never trained on, one table.

Same student (SmolLM2-135M-Instruct, LoRA), same steps for every trained row, this CPU. Rows:
  base pal / base cot          the untouched model prompted for a program / for steps (the forgetting floor)
  pal gsm8k (recipe)           PAL on the verified GSM8K train programs in the `v1 = 48 / 2` form (the recipe)
  pal gsm8k, named programs    the same, each given named from the question (data.program_names: true)
  named + retail mix + augm.   named programs + retail_math (data.mix 0.15) + verified variants (traces.augment k 1)
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

RECIPE = "examples/gsm8k_pal.yaml"  # the measured student is exactly what `reasonlite run` of this file trains
FULL = {"gsm8k_test": 500, "retail_test": 100, "base_limit": 50, "max_new_tokens": 256,
        "select": {"questions": 60, "n": 8}, "verifier": {"k": 4, "n_questions": 100, "steps": 60}}
QUICK = {"gsm8k_test": 6, "retail_test": 4, "base_limit": 3, "max_new_tokens": 64,
         "select": {"questions": 3, "n": 2}, "verifier": {"k": 2, "n_questions": 4, "steps": 2},
         "train": {"max_steps": 2, "batch_size": 2, "save_steps": 1000}, "n_train": 40}


def config(settings: dict, named: bool = False, mix_and_augment: bool = False):
    """The recipe's config (GSM8K programs only, v1 form); `named`: named programs; `mix_and_augment`: retail in
    training (weight 0.15) and one augmented variant per program, a fifth with a distractor."""
    from reasonlite.config import load_config

    overrides = {"data.n_test": settings["gsm8k_test"], "eval.max_new_tokens": settings["max_new_tokens"],
                 **{f"train.{k}": v for k, v in settings.get("train", {}).items()},
                 **({"data.n_train": settings["n_train"]} if "n_train" in settings else {})}
    cfg = load_config(Path(__file__).resolve().parents[1] / RECIPE, overrides)
    mix = [m.model_copy(update={"n_test": settings["retail_test"], **({"weight": 0.15} if mix_and_augment else {})})
           for m in cfg.data.mix]
    cfg.data = cfg.data.model_copy(update={"mix": mix, "program_names": named or cfg.data.program_names})
    if mix_and_augment:
        cfg.traces.augment = cfg.traces.augment.model_copy(update={"k": 1, "distractors": 0.2})
    cfg.name = "gsm8k-pal" + ("-named" if named else "") + ("-mix-aug" if mix_and_augment else "")
    return cfg


def train(cfg, root: Path) -> tuple[Path, float, dict]:
    """(exported student, CPU train seconds, trace manifest) via `pipeline.train_once` (cached by the train hash;
    a killed run resumes from its checkpoints)."""
    from reasonlite.pipeline import train_once

    model_dir, seconds = train_once(cfg, root)
    manifest_path = model_dir.parents[1] / "traces" / "manifest.json"
    return model_dir, seconds, json.loads(manifest_path.read_text()) if manifest_path.exists() else {}


def _metrics(m: dict, n: int) -> dict:
    keep = ("accuracy", "mean_tokens", "exec_error_rate", "first_accuracy", "vote_accuracy", "verifier_accuracy",
            "oracle_accuracy")
    return {**{k: round(m[k], 4) for k in keep if k in m}, "questions": n,
            "eval_seconds": round(m["seconds_per_question"] * n, 1)}


def evaluate_row(target, fmt: str, splits: dict, settings: dict, limit: int | None = None) -> dict:
    from reasonlite.evaluate import evaluate
    from reasonlite.infer import Student

    student = Student(str(target), fmt=fmt, batch_size=16, calculator=fmt == "cot")
    out = {}
    for split in ("test", *(f"retail_math:{s}" for s in RETAIL_SPLITS)):
        examples = splits[split][:limit] if limit else splits[split]
        result = evaluate(student, examples, max_new_tokens=settings["max_new_tokens"], progress=True,
                          data_name=split)
        out["gsm8k" if split == "test" else split.split(":", 1)[1]] = _metrics(result.points[0].metrics,
                                                                                 len(examples))
    del student
    return out


def _run_eval(model_dir: Path) -> dict | None:
    """The eval `reasonlite run` already did for this student (runs/<name>/eval/summary.json), as bench columns."""
    summary = model_dir.parents[1] / "eval" / "summary.json"
    if not summary.exists():
        return None
    per_split = json.loads(summary.read_text())["splits"]
    out = {}
    for split, per_model in per_split.items():
        m = per_model["student"]
        out["gsm8k" if split == "test" else split.split(":", 1)[1]] = {
            **{k: round(m[k], 4) for k in ("accuracy", "mean_tokens", "exec_error_rate") if k in m},
            "questions": m["total"], "eval_seconds": round(m["seconds_per_question"] * m["total"], 1)}
    return out


def selection_row(cfg, model_dir: Path, splits: dict, settings: dict, root: Path) -> dict:
    """Train the verifier on the student's own samples, then one set of n samples per GSM8K test question judged
    four ways: first sample, majority vote, verifier pick, oracle pass@n."""
    from reasonlite.evaluate import evaluate
    from reasonlite.infer import Student
    from reasonlite.verifier import Verifier, train_verifier_command

    cfg.verifier = cfg.verifier.model_copy(update=settings["verifier"])
    t0 = time.perf_counter()
    meta = train_verifier_command(cfg, model_dir, root / "verifier")
    verifier_minutes = (time.perf_counter() - t0) / 60
    student = Student(str(model_dir), fmt="pal", batch_size=16)
    examples = splits["test"][: settings["select"]["questions"]]
    result = evaluate(student, examples, n=settings["select"]["n"], temperature=0.7, select="verifier",
                      verifier=Verifier.load(root / "verifier"), max_new_tokens=settings["max_new_tokens"],
                      data_name="test")
    return {"n": settings["select"]["n"], "verifier_minutes": round(verifier_minutes, 1),
            "verifier_data": {k: meta.get(k) for k in ("samples", "positives", "final_loss")},
            "gsm8k": _metrics(result.points[0].metrics, len(examples))}


def run(quick: bool = False, workdir: str | None = None, only: tuple[str, ...] | None = None,
        student: str | None = None) -> dict:
    """`student`: the recipe's student already trained by `reasonlite run examples/gsm8k_pal.yaml` (its
    runs/gsm8k-pal/train/model), instead of training it here."""
    import torch

    from reasonlite.data.splits import load_splits

    settings = QUICK if quick else FULL
    root = Path(workdir or tempfile.mkdtemp(prefix="bench-generalise-"))
    root.mkdir(parents=True, exist_ok=True)
    rows_path = root / "rows.json"
    rows: dict[str, dict] = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    recipe = config(settings)
    splits = load_splits(recipe.data)

    def wanted(name: str) -> bool:
        return (only is None or name in only) and name not in rows

    def save(name: str, row: dict) -> None:
        # re-read first: two bench processes may fill one workdir's rows (e.g. --only per row, in parallel)
        rows.update({**(json.loads(rows_path.read_text()) if rows_path.exists() else {}), name: row})
        rows_path.write_text(json.dumps(rows, indent=2))  # each finished row survives a later crash

    main = "pal gsm8k (recipe)"
    plan = [(main, recipe), ("pal gsm8k, named programs", config(settings, named=True)),
            ("named + retail mix + augmentation", config(settings, named=True, mix_and_augment=True))]
    trained: dict[str, Path] = {}
    for name, cfg in plan:
        if not (wanted(name) or (name == main and wanted("vote / verifier"))):
            continue
        console.rule(f"[bold]{name}")
        if name == main and student:
            model_dir, seconds, manifest = Path(student), None, {}
            metrics = Path(student).parent / "metrics.json"
            seconds = json.loads(metrics.read_text()).get("total_train_seconds") if metrics.exists() else None
            manifest_path = Path(student).parents[1] / "traces" / "manifest.json"
            manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        else:
            model_dir, seconds, manifest = train(cfg, root)
        trained[name] = model_dir
        if wanted(name):
            measured = _run_eval(Path(student)) if name == main and student else None
            save(name, {"format": "pal", "steps": cfg.train.max_steps,
                        "train_minutes": round(seconds / 60, 1) if seconds else None,
                        "augmentation": manifest.get("augmentation"),
                        **(measured or evaluate_row(model_dir, "pal", splits, settings))})
    if main in trained and wanted("vote / verifier"):
        console.rule("[bold]vote / verifier")
        save("vote / verifier", selection_row(recipe, trained[main], splits, settings, root))
    for name, fmt in (("base pal", "pal"), ("base cot + calculator", "cot")):
        if wanted(name):
            console.rule(f"[bold]{name} (untuned)")
            save(name, {"format": fmt, "steps": 0, "train_minutes": 0.0,
                        **evaluate_row(STUDENT, fmt, splits, settings, limit=settings["base_limit"])})
    print_table(rows, quick)
    return {"quick": quick, "student": STUDENT, "recipe": RECIPE, "settings": settings,
            "cpu_threads": torch.get_num_threads(), "results": rows}


def print_table(rows: dict, quick: bool = False) -> None:
    table = Table(title=f"generalisation, {STUDENT}, LoRA, same steps ({'quick' if quick else 'full'})")
    for col in ("row", "steps", "train min", "GSM8K", "retail held-out families", "retail reworded", "retail test",
                "mean tok (GSM8K)"):
        table.add_column(col, justify="right" if col != "row" else "left")

    def cell(r: dict, key: str) -> str:
        return f"{r[key]['accuracy']:.1%} ({r[key]['questions']})" if key in r else "–"

    for name, r in rows.items():
        if "n" in r:  # the selection row: one line per way of picking among the same n samples
            g = r["gsm8k"]
            for key in ("first_accuracy", "vote_accuracy", "verifier_accuracy", "oracle_accuracy"):
                table.add_row(f"{key.removesuffix('_accuracy')} of n={r['n']}", "", "",
                              f"{g.get(key, 0):.1%} ({g['questions']})", "–", "–", "–", f"{g['mean_tokens']:.0f}")
            continue
        table.add_row(name, str(r.get("steps", "")), f"{r.get('train_minutes') or 0:.1f}", cell(r, "gsm8k"),
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
    student = args[args.index("--student") + 1] if "--student" in args else None
    out = run(quick="--quick" in args, workdir=workdir, only=only, student=student)
    Path("bench-results").mkdir(exist_ok=True)
    Path("bench-results/generalise.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
