"""`slm-fusion merge-tune CONFIG --space SPACE`: an Optuna study over merge settings, scored on each task's dev set.

Each trial merges the models of the merge YAML with a sampled method and parameters (per-model weight and density,
lambda, slerp's t; optionally weights as a gradient across layers), streams the merged model to disk as `slm-fusion
merge` does, scores it on every task set's *dev* questions (`reasonlite.evaluate.load_dev_data`: never the test
split) and deletes it. One objective per task: the merged model's dev accuracy divided by its specialist's (computed
once per study and kept in the study, so a resumed study does not pay for them again). Multi-objective (all
maximised): the Pareto front over the tasks, and the best setting by the worst task (maximin), written as a merge
YAML that `slm-fusion merge` and `merge-eval` take as they are.

Storage and crash safety are `reasonlite tune`'s: SQLite in the output folder (or `--storage` URL), heartbeats, a
trial killed with its worker is failed and retried once by the next run; `trials:` in the space caps completed ones.

Space YAML:
    methods: [task_arithmetic, ties, dare_ties]
    weight: {low: 0.3, high: 1.5}     # per model
    density: {low: 0.2, high: 1.0}    # per model, methods that trim (ties, dare_*)
    lambda: {low: 0.5, high: 1.5}     # methods that scale the merged task vector
    gradient: false                   # true: each model's weight is [first layer, last layer], interpolated
    trials: 12                        # completed trials in all (resumed runs count what is done)
    dev_limit: 30                     # dev questions per task
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console
from rich.table import Table

from slm_fusion.merging.config import MergeConfig, MergeConfigError
from slm_fusion.merging.methods import MERGE_METHODS

console = Console()


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float = Field(..., description="smallest value tried")
    high: float = Field(..., description="largest value tried")
    log: bool = Field(False, description="sample on a log scale")


class MergeSpace(BaseModel):
    """What `merge-tune` searches; a parameter a method does not use is not sampled for it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    methods: list[str] = Field(["task_arithmetic", "ties", "dare_ties"], min_length=1,
                               description="merge methods to try")
    weight: Range = Field(Range(low=0.3, high=1.5), description="per-model weight")
    density: Range = Field(Range(low=0.2, high=1.0), description="per-model fraction of the task vector kept")
    lambda_: Range = Field(Range(low=0.5, high=1.5), alias="lambda", description="scale of the merged task vector")
    t: Range = Field(Range(low=0.2, high=0.8), description="slerp: 0 = first model, 1 = second")
    gradient: bool = Field(False, description="per-model weight as a [first layer, last layer] gradient")
    trials: int | None = Field(None, ge=1, description="completed trials in all, across runs and workers")
    dev_limit: int = Field(30, ge=1, description="dev questions per task")
    study_name: str = Field("merge-tune", description="Optuna study name inside the storage")

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in MERGE_METHODS]
        if unknown:
            raise ValueError(f"unknown merge method(s) {unknown}; use some of {sorted(MERGE_METHODS)}")
        return methods


def load_space(path: str | Path, cfg: MergeConfig) -> MergeSpace:
    from reasonlite.config import format_validation_error

    path = Path(path)
    if not path.exists():
        raise MergeConfigError(f"--space {path}: file not found; write a YAML with methods/weight/density/lambda")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise MergeConfigError(f"--space {path}: a YAML mapping with methods, weight, density, lambda, trials")
    try:
        space = MergeSpace.model_validate(data)
    except ValidationError as err:
        raise MergeConfigError(format_validation_error(err, f"--space {path}")) from None
    for method in space.methods:
        spec = MERGE_METHODS[method]
        if spec.needs_base and not cfg.base_model:
            raise MergeConfigError(f"--space {path}: methods: '{method}' needs `base_model` in the merge config")
        if spec.n_models is not None and spec.n_models != len(cfg.models):
            raise MergeConfigError(f"--space {path}: methods: '{method}' merges exactly {spec.n_models} models, the "
                                   f"config lists {len(cfg.models)}; drop it from methods")
    missing = [i for i, m in enumerate(cfg.models) if m.eval is None]
    if missing:
        raise MergeConfigError(f"models[{missing[0]}].eval: merge-tune scores every model's task; add "
                               "`eval: {data: retail_math|gsm8k|FILE.jsonl, dev: DEV.jsonl}` to each model")
    for i, m in enumerate(cfg.models):
        if m.eval.data not in ("retail_math", "gsm8k") and not m.eval.dev:
            raise MergeConfigError(f"models[{i}].eval.dev: a file task needs its own dev file for tuning (its "
                                   f"`data` {m.eval.data} is the test set); add `dev: DEV.jsonl`")
    return space


def _value(trial, name: str, r: Range) -> float:
    return trial.suggest_float(name, r.low, r.high, log=r.log)


def suggest(trial, space: MergeSpace, cfg: MergeConfig) -> dict[str, Any]:
    """A merge config dict (the input YAML with the sampled method and parameters)."""
    method = trial.suggest_categorical("method", space.methods)
    spec = MERGE_METHODS[method]
    models = []
    for i, m in enumerate(cfg.models):
        params: dict[str, Any] = {}
        if "weight" in spec.model_params:
            if space.gradient:
                params["weight"] = [_value(trial, f"{method}.weight{i}.first", space.weight),
                                    _value(trial, f"{method}.weight{i}.last", space.weight)]
            else:
                params["weight"] = _value(trial, f"{method}.weight{i}", space.weight)
        if "density" in spec.model_params:
            params["density"] = _value(trial, f"{method}.density{i}", space.density)
        models.append({**m.model_dump(exclude_none=True, exclude={"parameters"}), "parameters": params})
    parameters: dict[str, Any] = {}
    if "lambda" in spec.global_params:
        parameters["lambda"] = _value(trial, f"{method}.lambda", space.lambda_)
    if "t" in spec.global_params:
        parameters["t"] = _value(trial, f"{method}.t", space.t)
    base = cfg.model_dump(exclude_none=True, exclude={"merge_method", "models", "parameters"})
    return {**base, "merge_method": method, "models": models, "parameters": parameters}


class TaskScorer:
    """Scores a model on every task's dev questions (loaded once), prompted in the task's format."""

    def __init__(self, cfg: MergeConfig, dev_limit: int, batch_size: int = 16) -> None:
        from reasonlite.evaluate import load_dev_data
        from slm_fusion.merging.evaluate import format_of

        self.cfg, self.batch_size = cfg, batch_size
        self.tasks = []
        for i, m in enumerate(cfg.models):
            examples = load_dev_data(m.eval.dev or m.eval.data, limit=dev_limit, seed=cfg.seed)
            if not examples:
                raise MergeConfigError(f"models[{i}].eval: no dev questions in {m.eval.dev or m.eval.data}")
            self.tasks.append((m.eval, format_of(m.model, m.eval.format), examples))

    def names(self) -> list[str]:
        return [f"task{i}:{task.data}" for i, (task, _, _) in enumerate(self.tasks)]

    def score_task(self, index: int, model: str | Path) -> float:
        """Dev accuracy of `model` on task `index`."""
        from reasonlite.evaluate import evaluate
        from reasonlite.infer import Student

        task, fmt, examples = self.tasks[index]
        student = Student(str(model), fmt=fmt, batch_size=self.batch_size, name=f"merge-tune-{index}")
        result = evaluate(student, examples, budgets=[task.budget], n=1, seed=self.cfg.seed,
                          batch_size=self.batch_size, progress=False)
        return result.points[0].metrics["accuracy"]

    def score(self, model: str | Path) -> list[float]:
        """Dev accuracy on each task."""
        return [self.score_task(i, model) for i in range(len(self.tasks))]


def open_merge_study(out_dir: Path, space: MergeSpace, n_tasks: int, storage: str | None):
    """Create or load the study (reasonlite tune's storage: heartbeats, stale trials failed and retried once)."""

    from reasonlite.tune import _sampler, check_storage_url, create_or_load_study, rdb_storage

    url = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    check_storage_url(url)
    out_dir.mkdir(parents=True, exist_ok=True)
    rdb = rdb_storage(url, int(os.environ.get("REASONLITE_TUNE_HEARTBEAT_S", "30")))
    study = create_or_load_study(rdb, space.study_name, ["maximize"] * n_tasks, url)
    study.sampler = _sampler("tpe", int.from_bytes(os.urandom(4), "little"))  # a resumed study explores anew
    return study


def specialist_scores(study, cfg: MergeConfig, scorer: TaskScorer) -> list[float]:
    """Each specialist's dev accuracy on its own task, computed once and stored on the study."""
    stored = study.user_attrs.get("specialist_dev_accuracy")
    if stored is not None:
        return stored
    scores = []
    for i, m in enumerate(cfg.models):
        console.print(f"specialist {i} ({m.model}) on its dev set ...")
        scores.append(scorer.score_task(i, m.model))
    study.set_user_attr("specialist_dev_accuracy", scores)
    return scores


def normalised(accuracy: list[float], specialist: list[float]) -> list[float]:
    """Accuracy as a fraction of the specialist's (a specialist at 0% gives the raw accuracy: nothing to keep)."""
    return [a / s if s > 0 else a for a, s in zip(accuracy, specialist, strict=True)]


def make_objective(cfg: MergeConfig, space: MergeSpace, scorer: TaskScorer, specialist: list[float], out_dir: Path,
                   total: int):
    from slm_fusion.merging.driver import run_merge

    started = [0]

    def objective(trial) -> list[float]:
        started[0] += 1
        merge_cfg = suggest(trial, space, cfg)
        trial.set_user_attr("merge_config", merge_cfg)
        console.print(f"[bold]trial {started[0]}/{total}[/bold] (study trial #{trial.number}) "
                      f"{json.dumps(trial.params)}", highlight=False)
        folder = out_dir / "trials" / f"trial-{trial.number:04d}"
        try:
            t0 = time.perf_counter()
            run_merge(MergeConfig.model_validate(merge_cfg), folder / "model", show_progress=False)
            accuracy = scorer.score(folder / "model")
        except Exception as e:  # recorded on the trial, never fatal for the study
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            console.print(f"[red]trial {trial.number} failed[/red]: {type(e).__name__}: {e}")
            raise
        finally:
            shutil.rmtree(folder / "model", ignore_errors=True)  # a merged model per trial would fill the disk
        values = normalised(accuracy, specialist)
        trial.set_user_attr("dev_accuracy", accuracy)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
        console.print(f"  dev accuracy {[f'{a:.1%}' for a in accuracy]}, normalised "
                      f"{[f'{v:.2f}' for v in values]}")
        return values

    return objective


def pick_best(trials):
    """Maximin: the trial whose worst normalised task is best (mean breaks ties)."""
    return max(trials, key=lambda t: (min(t.values), sum(t.values)))


def write_outputs(out_dir: Path, study, cfg: MergeConfig, tasks: list[str]) -> dict:
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    front = study.best_trials if done else []
    specialist = study.user_attrs.get("specialist_dev_accuracy")
    scored = (", ".join(f"{n} {a:.1%}" for n, a in zip(tasks, specialist, strict=True)) if specialist
              else "(not scored)")
    lines = [f"# merge-tune study `{study.study_name}`", "",
             (f"{len(done)} complete trials, {len(failed)} failed. Objectives (maximised): each task's dev accuracy "
              "divided by its specialist's."), "",
             f"Specialists on their dev sets: {scored}", "",
             "## Pareto front", "", "| trial | " + " | ".join(tasks) + " | worst | method | params |",
             "|---|" + "---|" * len(tasks) + "---|---|---|"]
    for t in sorted(front, key=lambda t: min(t.values), reverse=True):
        vals = " | ".join(f"{v:.2f}" for v in t.values)
        lines.append(f"| {t.number} | {vals} | {min(t.values):.2f} | {t.params['method']} | "
                     f"`{json.dumps({k: round(v, 3) for k, v in t.params.items() if k != 'method'})}` |")
    summary: dict[str, Any] = {"complete_trials": len(done), "failed": len(failed), "tasks": tasks,
                               "specialist_dev_accuracy": specialist, "pareto": [t.number for t in front],
                               "trials": [{"number": t.number, "params": t.params, "normalised": t.values,
                                           "dev_accuracy": t.user_attrs.get("dev_accuracy")} for t in done]}
    if front:
        best = pick_best(front)
        best_path = out_dir / "best_merge.yaml"
        best_path.write_text(f"# merge-tune: trial {best.number}, normalised dev accuracy "
                             f"{[round(v, 3) for v in best.values]} (picked by its worst task)\n"
                             + yaml.safe_dump(best.user_attrs["merge_config"], sort_keys=False))
        summary.update(best=best.number, best_yaml=str(best_path), best_normalised=best.values)
        lines += ["", f"Best by the worst task: trial {best.number} -> `{best_path.name}`"]
    (out_dir / "pareto.md").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def merge_tune(cfg: MergeConfig, space: MergeSpace, out_dir: str | Path, trials: int,
               storage: str | None = None, batch_size: int = 16) -> dict:
    """Run (or continue) the study for up to `trials` more trials (capped by `space.trials` completed in all)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from reasonlite.tune import fail_trials_dead_before_first_heartbeat

    out_dir = Path(out_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scorer = TaskScorer(cfg, space.dev_limit, batch_size)
    study = open_merge_study(out_dir, space, len(cfg.models), storage)
    fail_trials_dead_before_first_heartbeat(study)
    callbacks = []
    if space.trials:
        callbacks.append(MaxTrialsCallback(space.trials, states=(TrialState.COMPLETE,)))
        done = len([t for t in study.trials if t.state == TrialState.COMPLETE])
        trials = min(trials, max(space.trials - done, 0))
    if trials:
        specialist = specialist_scores(study, cfg, scorer)
        study.optimize(make_objective(cfg, space, scorer, specialist, out_dir, trials), n_trials=trials,
                       callbacks=callbacks, catch=(Exception,), gc_after_trial=True)
    summary = write_outputs(out_dir, study, cfg, scorer.names())
    _print(study, summary)
    return summary


def _print(study, summary: dict) -> None:
    table = Table(title=f"merge-tune Pareto front — study {study.study_name}")
    table.add_column("trial")
    for name in summary["tasks"]:
        table.add_column(f"{name} (norm.)", justify="right")
    table.add_column("method")
    for t in sorted(study.best_trials, key=lambda t: min(t.values), reverse=True):
        table.add_row(str(t.number), *[f"{v:.2f}" for v in t.values], t.params["method"])
    console.print(table)
    console.print(f"{summary['complete_trials']} complete trials, {summary['failed']} failed; best by the worst task: "
                  f"trial {summary.get('best')} -> {summary.get('best_yaml')}")
