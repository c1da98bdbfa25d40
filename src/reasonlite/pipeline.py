"""`reasonlite run`: traces -> train -> eval -> export in one run folder.

Each stage's output lives in a content-addressed folder `<runs_dir>/_stages/<stage>-<hash>/`, where the hash covers
the config sections the stage (and the stages before it) depend on (`config.STAGE_SECTIONS`). The run folder links
to them. So changing only the learning rate reuses the trace set and never calls the teacher again, and tuning trials
that share a trace set share it. `force` reruns a stage (and, by hash, nothing else changes). Each stage reads only
its view of the config (`cfg.stage_view(stage)`: the same sections as its hash), so no knob outside the hash can make
a reused stage stale.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reasonlite.config import ReasonLiteConfig, StageView, build_config, dump_config, parse_override, stage_hash

console = Console()
STAGES = ("traces", "train", "eval")


@dataclass
class PipelineResult:
    run_dir: Path
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "reused"
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # eval summary of the student (and base when compared)

    @property
    def model_dir(self) -> Path:
        return self.stage_dirs["train"] / "model"


def _done_marker(folder: Path) -> Path:
    return folder / ".stage-complete"


def _link(run_dir: Path, name: str, target: Path) -> None:
    link = run_dir / name
    if not link.is_symlink() and link.is_dir():
        shutil.rmtree(link)
    # Relative links keep a runs/ folder valid when it is moved or copied as a whole; the new link is made beside
    # and renamed over the old one, so `runs/<name>/<stage>` always points at a whole stage folder.
    tmp = run_dir / f".{name}.link-tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target.resolve(), run_dir.resolve()), target_is_directory=True)
    os.replace(tmp, link)


def stage_folder(cfg: ReasonLiteConfig, name: str) -> Path:
    """`<runs_dir>/_stages/<stage>-<hash>`: the only place a stage of this config is ever written."""
    return Path(cfg.runs_dir) / "_stages" / f"{name}-{stage_hash(cfg, name)}"


def run_stage(cfg: ReasonLiteConfig, name: str, fn, force: bool = False) -> tuple[Path, str]:
    """Run `fn(folder)` in this config's own stage folder unless it is complete (or `force`), then link
    `runs/<name>/<stage>` to it. A complete folder is immutable: other configs get other folders, so a command with
    a changed knob can never write through the run folder's link into a stage another config cached."""
    folder = stage_folder(cfg, name)
    marker = _done_marker(folder)
    if marker.exists() and not force:
        status = "reused"
        console.print(f"[green]✓ {name}[/green]: reusing {folder} (config unchanged for this stage)")
    else:
        # A folder without its marker is a crashed attempt: the stage itself resumes from what it kept
        # (teacher cache, training checkpoints), so it is not deleted. A forced rerun first drops the marker, so a
        # kill during the rerun never leaves a half-rewritten folder marked complete.
        marker.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        fn(folder)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": time.perf_counter() - t0, "finished": time.time()}))
        os.replace(tmp, marker)
        status = "ran"
    run_dir = Path(cfg.runs_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    _link(run_dir, name, folder)
    return folder, status


def traces_for(cfg: ReasonLiteConfig) -> Path:
    """The trace set `reasonlite train` reads: this config's own complete traces stage, else the run's link."""
    own = stage_folder(cfg, "traces")
    return own if _done_marker(own).exists() else Path(cfg.runs_dir) / cfg.name / "traces"


def _stage(cfg: ReasonLiteConfig, name: str, force: tuple[str, ...], result: PipelineResult, fn) -> Path:
    folder, result.stages[name] = run_stage(cfg, name, fn, force=name in force)
    result.stage_dirs[name] = folder
    return folder


def _eval_stage(cfg: ReasonLiteConfig | StageView, model_dir: Path, out: Path) -> dict:
    """Evaluate the student (and the untrained base prompted the same way) on each configured split. Reads only the
    eval stage's view of `cfg` (`config.STAGE_SECTIONS`): every knob it uses is in the eval hash."""
    from reasonlite.context import sources_for
    from reasonlite.data.splits import load_splits
    from reasonlite.evaluate import evaluate, write_report
    from reasonlite.infer import Student

    cfg = cfg.stage_view("eval")
    splits = load_splits(cfg.data)
    missing = [s for s in cfg.eval.splits if s not in splits]
    if missing:
        raise ValueError(f"eval.splits: {missing} not produced by data.source '{cfg.data.source}' "
                         f"(available: {', '.join(k for k in splits if k != 'train')})")
    targets = {"student": str(model_dir)}
    if cfg.eval.compare_base:
        targets["base"] = cfg.student.model
    budgets = [cfg.budget.reasoning_budget, *[b for b in cfg.eval.budgets if b != cfg.budget.reasoning_budget]]
    summary: dict = {"splits": {}, "budgets": budgets}
    modes = list(cfg.eval.context_modes)
    by_context = modes != ["none"]  # per-mode results, only when asked for (the summary of other runs is unchanged)
    if by_context:
        summary.update(context_modes=modes, by_context={})
    # each split's questions and their sources per mode, once for every target (retrieval is not asked twice)
    asked = {split: splits[split][: cfg.eval.limit] if cfg.eval.limit else splits[split] for split in cfg.eval.splits}
    sourced = {(split, mode): sources_for(examples, mode, cfg.context, cfg.runs_dir, knob="eval.context_modes")
               for split, examples in asked.items() for mode in modes}
    for target_name, ref in targets.items():
        student = Student(ref, fmt=cfg.student.format, forcing=cfg.budget.forcing,
                          answer_tokens=cfg.budget.answer_tokens, batch_size=cfg.eval.batch_size,
                          calculator=cfg.eval.calculator, name=target_name)
        # The base model only gets the run's own budget setting: the extra budgets are about the student.
        target_budgets = budgets if target_name == "student" else budgets[:1]
        verifier, select = None, cfg.eval.select
        if select == "verifier":  # trained on the student's samples: the base model answers by vote instead
            from reasonlite.verifier import Verifier

            verifier = Verifier.load(cfg.eval.verifier_path, batch_size=cfg.eval.batch_size) \
                if target_name == "student" else None
            select = "verifier" if verifier is not None else "vote"
        for split, examples in asked.items():
            for mode in modes:  # eval.context_modes: the first mode's results are the split's headline numbers
                sources = sourced[split, mode]
                result = evaluate(student, examples, budgets=target_budgets, n=cfg.eval.n,
                                  temperature=cfg.eval.temperature, early_exit=cfg.eval.early_exit,
                                  max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                  seed=cfg.train.seed, data_name=f"{cfg.data.source}:{split}", select=select,
                                  verifier=verifier, sources=None if mode == "none" else sources, context_mode=mode)
                write_report(result, out / (f"{target_name}-{split}" if mode == "none" else
                                            f"{target_name}-{split}-context-{mode}"))
                if by_context:
                    summary["by_context"].setdefault(mode, {}).setdefault(split, {})[target_name] = \
                        result.points[0].metrics
                if mode != modes[0]:
                    continue
                summary["splits"].setdefault(split, {})[target_name] = result.points[0].metrics
                if target_name == "student" and len(result.points) > 1:
                    summary.setdefault("budget_sweep", {})[split] = [
                        {"budget": p.budget, **p.metrics} for p in result.points]
        del student
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_run_report(cfg, summary, out)
    return summary


def _write_run_report(cfg: StageView, summary: dict, out: Path) -> None:
    lines = [f"# ReasonLite run `{cfg.name}`", "",
             (f"Student `{cfg.student.model}` trained as `{cfg.student.format}` on `{cfg.data.source}` "
              f"(teacher `{cfg.teacher.kind}`), inference cap {cfg.budget.reasoning_budget}."), "",
             "| split | model | accuracy | mean tokens | p95 tokens | latency s/q | exec errors |",
             "|---|---|---|---|---|---|---|"]
    for split, per_model in summary["splits"].items():
        for name, m in per_model.items():
            lines.append(f"| {split} | {name} | {m['accuracy']:.1%} | {m['mean_tokens']:.1f} | {m['p95_tokens']:.0f} "
                         f"| {m['seconds_per_question']:.2f} | {m['exec_error_rate']:.1%} |")
    if "by_context" in summary:
        lines += ["", "## Accuracy by context mode (eval.context_modes)", "",
                  "| split | model | " + " | ".join(summary["context_modes"]) + " |",
                  "|---|---|" + "---|" * len(summary["context_modes"])]
        for split, per_model in summary["splits"].items():
            for name in per_model:
                cells = [f"{summary['by_context'][mode][split][name]['accuracy']:.1%}"
                         for mode in summary["context_modes"]]
                lines.append(f"| {split} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per-target reports (breakdowns, plots): " + ", ".join(
        f"[{d.name}]({d.name}/report.md)" for d in sorted(out.iterdir()) if d.is_dir())]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def run_pipeline(cfg: ReasonLiteConfig, force: tuple[str, ...] = (), nproc: int = 1) -> PipelineResult:
    """Run (or reuse) every stage for this config (training on `nproc` processes); returns where everything is and
    the eval summary."""
    bad = [f for f in force if f not in STAGES]
    if bad:
        raise ValueError(f"--force {bad[0]}: unknown stage; use one of {', '.join(STAGES)}")
    # Forcing a stage forces the ones after it: their inputs changed.
    force = tuple(STAGES[min(STAGES.index(f) for f in force):]) if force else ()
    run_dir = Path(cfg.runs_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    result = PipelineResult(run_dir)

    from reasonlite.traces import build_trace_set
    from reasonlite.train.distributed import launch

    traces_dir = _stage(cfg, "traces", force, result, lambda out: build_trace_set(cfg, out))
    # resume: a crashed attempt continues from its newest complete checkpoint; a forced rerun starts over.
    train_dir = _stage(cfg, "train", force, result,
                       lambda out: launch(cfg, traces_dir, out, nproc, resume="train" not in force,
                                          fresh="train" in force))
    eval_dir = _stage(cfg, "eval", force, result, lambda out: _eval_stage(cfg, train_dir / "model", out))
    result.metrics = json.loads((eval_dir / "summary.json").read_text())

    from reasonlite.train.export import update_model_card

    update_model_card(train_dir / "model", result.metrics)
    (run_dir / "pipeline.json").write_text(json.dumps(
        {"stages": result.stages, "stage_dirs": {k: str(v) for k, v in result.stage_dirs.items()},
         "metrics": result.metrics}, indent=2))
    write_serve_config(run_dir, train_dir / "model", cfg)
    return result


def train_once(cfg: ReasonLiteConfig, cache_root: str | Path) -> tuple[Path, float]:
    """(exported student folder, train seconds) for `cfg`: the trace set and the student are built in
    `cache_root/<train-stage hash>/` the first time and reused afterwards (benchmarks and scripts that need a trained
    student but not a whole run folder). An interrupted build resumes from its teacher cache and checkpoints."""
    folder = Path(cache_root) / stage_hash(cfg, "train")
    model_dir, metrics = folder / "train" / "model", folder / "train" / "metrics.json"
    if (model_dir / "config.json").exists():
        console.print(f"[dim]cached student: {model_dir}[/dim]")
        return model_dir, json.loads(metrics.read_text()).get("total_train_seconds", 0.0) if metrics.exists() else 0.0
    from reasonlite.traces import build_trace_set
    from reasonlite.train import train_student

    build_trace_set(cfg, folder / "traces")
    result = train_student(cfg, folder / "traces", folder / "train", resume=True)
    return Path(result.export_dir), result.train_seconds


def write_serve_config(run_dir: Path, model_dir: Path, cfg: ReasonLiteConfig) -> Path:
    """A ready SLM-Fusion config serving the exported student (the printed `slm-fusion serve` command uses it), and
    its GGUF through llama.cpp as `<name>-gguf` once `reasonlite export --gguf` has written one."""
    import yaml

    from reasonlite.gguf_export import exported_gguf

    # the prompt is rewritten into the student's training prompt; step_by_step answers with [label]
    reasoning = {"format": "answer" if cfg.student.format == "step_by_step" else cfg.student.format,
                 "student_prompt": True, "reasoning_budget": cfg.budget.reasoning_budget,
                 "answer_tokens": cfg.budget.answer_tokens}
    models = [{"name": cfg.name, "backend": "transformers", "model": str(model_dir.resolve()), "reasoning": reasoning}]
    gguf = exported_gguf(run_dir / "export")
    if gguf is not None:
        models.append({"name": f"{cfg.name}-gguf", "backend": "llamacpp", "model": str(gguf.resolve()),
                       "reasoning": reasoning})
    path = run_dir / "serve.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


# --- the quickstart -------------------------------------------------------------------------------------------------

DEMO_DEFAULTS = {
    "name": "demo-retail-pal",
    "data": {"source": "retail_math", "n_train": 400, "n_test": 40, "n_test_heldout_templates": 40},
    "teacher": {"kind": "dataset"},
    "traces": {"style": "pal"},
    "student": {"model": "smollm2-135m-instruct", "format": "pal"},
    # The setting benchmarks/bench_distill.py measured at 100% on held-out questions of the training templates.
    "train": {"max_steps": 60, "learning_rate": 2e-3, "max_length": 320},
    "budget": {"reasoning_budget": 160},
    "eval": {"splits": ["test", "test_heldout_families", "test_reworded"], "compare_base": True},
}


def print_summary(result: PipelineResult) -> None:
    table = Table(title=f"ReasonLite results — {result.run_dir}")
    # Split names are what users look up in the report ("retail_math:test_reworded"): never cut; the numbers'
    # headers fold onto two lines instead.
    table.add_column("split", no_wrap=True)
    table.add_column("model", no_wrap=True)
    for col in ("accuracy", "mean\ntokens", "p95\ntokens", "s per\nquestion", "exec\nerrors"):
        table.add_column(col, justify="right", no_wrap=True)
    by_context = result.metrics.get("by_context")
    rows = [(f"{split} ({mode})", per_model) for mode, splits in by_context.items()
            for split, per_model in splits.items()] if by_context else result.metrics.get("splits", {}).items()
    for split, per_model in rows:
        for model_name, m in per_model.items():
            table.add_row(split, model_name, f"{m['accuracy']:.1%}", f"{m['mean_tokens']:.1f}", f"{m['p95_tokens']:.0f}",
                          f"{m['seconds_per_question']:.2f}", f"{m.get('exec_error_rate', 0):.1%}")
    # A log file or pipe has no width: rich would squeeze to 80 columns and cut the split names.
    (console if console.is_terminal else Console(width=max(console.width, 110))).print(table)


def print_outputs(result: PipelineResult) -> None:
    console.print(f"Report:         {result.run_dir / 'eval' / 'report.md'}")
    console.print(f"Exported model: {result.run_dir / 'train' / 'model'}")
    console.print(f"Serve it:       slm-fusion serve {result.run_dir / 'serve.yaml'} --port 8000")


def run_demo(overrides: list[str] | None = None) -> PipelineResult:
    cfg = build_config(DEMO_DEFAULTS, dict(parse_override(o) for o in overrides or []), source="demo defaults")
    console.print("[bold]ReasonLite quickstart[/bold]: retail-math, dataset teacher (gold programs), "
                  f"{cfg.student.model} student, PAL distillation, inference cap {cfg.budget.reasoning_budget} tokens.")
    t0 = time.perf_counter()
    result = run_pipeline(cfg)
    print_summary(result)
    console.print(f"Finished in {(time.perf_counter() - t0) / 60:.1f} min.")
    print_outputs(result)
    return result
