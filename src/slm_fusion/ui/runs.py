"""ReasonLite run folders for the console's Runs page: read what `reasonlite run` and `reasonlite tune` wrote, and
say "not present" (None) for what is missing — a run still training has no eval yet, most have no tune study.

```
<runs_dir>/<run>/config.yaml, pipeline.json            the run (reasonlite.pipeline.run_pipeline)
<runs_dir>/<run>/train/metrics.json                    loss_history once training finished (reasonlite.train)
<runs_dir>/<run>/train/checkpoints/*/trainer_state.json log_history while it is still training (HF Trainer)
<runs_dir>/<run>/eval/summary.json                     accuracy, tokens, latency per split and target
<runs_dir>/<run>/eval/<target>-<split>/result.json     one point per budget (reasonlite.evaluate.write_report)
<runs_dir>/tune-<study>/study.db                       the Optuna study of `reasonlite tune` (reasonlite.tune)
```
Only files are read, never written; a file that does not parse is reported in `problems`, not raised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

EVAL_COLUMNS = ("accuracy", "total", "mean_tokens", "p95_tokens", "mean_reasoning_tokens", "mean_answer_tokens",
                "seconds_per_question", "tokens_per_s", "exec_error_rate", "forced_rate", "mean_agreement")


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """The run folders (those with a config.yaml), newest first, with what each holds."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = []
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith(("_", ".")) and (folder / "config.yaml").is_file():
            runs.append({"name": folder.name, "modified": round((folder / "config.yaml").stat().st_mtime, 3),
                         "train": (folder / "train").is_dir(), "eval": (folder / "eval" / "summary.json").is_file()})
    return sorted(runs, key=lambda r: r["modified"], reverse=True)


def run_folder(runs_dir: str | Path, name: str) -> Path | None:
    """The folder of run `name`, only when it is one of `list_runs` (a name is never joined into a path unchecked)."""
    return Path(runs_dir) / name if any(r["name"] == name for r in list_runs(runs_dir)) else None


def read_run(runs_dir: str | Path, folder: Path) -> dict[str, Any]:
    problems: list[str] = []
    config_text = (folder / "config.yaml").read_text()
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as e:
        config = {}
        problems.append(f"config.yaml does not parse: {e}")
    pipeline = _json(folder / "pipeline.json", problems)
    loss, loss_source = _loss(folder / "train", problems)
    train = _json(folder / "train" / "metrics.json", problems)
    return {
        "name": folder.name,
        "config": config_text,
        "stages": (pipeline or {}).get("stages"),
        "train": {k: train.get(k) for k in ("steps", "final_loss", "train_seconds", "tokens_per_second", "rows")}
        if isinstance(train, dict) else None,
        "loss": loss, "loss_source": loss_source,
        "eval": _eval_table(folder / "eval", problems),
        "accuracy_vs_tokens": _accuracy_vs_tokens(folder / "eval", problems),
        "tune": _tune(Path(runs_dir), config, problems),
        "problems": problems,
    }


def _json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path.parent.name}/{path.name} does not parse: {e}")
        return None


def _loss(train: Path, problems: list[str]) -> tuple[list[dict[str, float]] | None, str | None]:
    """The loss curve: metrics.json's once training is done, else the newest checkpoint's trainer_state.json."""
    metrics = _json(train / "metrics.json", problems)
    if isinstance(metrics, dict) and metrics.get("loss_history"):
        return _points(metrics["loss_history"]), "train/metrics.json"
    def step(path: Path) -> int:
        suffix = path.parent.name.removeprefix("checkpoint-")
        return int(suffix) if suffix.isdigit() else -1

    for state_path in sorted(train.glob("checkpoints/checkpoint-*/trainer_state.json"), key=step, reverse=True):
        state = _json(state_path, problems)
        if isinstance(state, dict) and state.get("log_history"):
            return _points(state["log_history"]), f"train/checkpoints/{state_path.parent.name}/trainer_state.json"
    return None, None


def _points(history: list[Any]) -> list[dict[str, float]]:
    return [{"step": h["step"], "loss": h["loss"]} for h in history
            if isinstance(h, dict) and isinstance(h.get("step"), int | float) and isinstance(h.get("loss"), int | float)]


def _eval_table(eval_dir: Path, problems: list[str]) -> list[dict[str, Any]] | None:
    summary = _json(eval_dir / "summary.json", problems)
    if not isinstance(summary, dict) or not isinstance(summary.get("splits"), dict):
        return None
    return [{"split": split, "target": target, **{k: m.get(k) for k in EVAL_COLUMNS}}
            for split, per_target in summary["splits"].items() for target, m in per_target.items()]


def _accuracy_vs_tokens(eval_dir: Path, problems: list[str]) -> list[dict[str, Any]] | None:
    """One series per eval report folder (`<target>-<split>`): a point per budget, accuracy against mean tokens."""
    series = []
    for path in sorted(eval_dir.glob("*/result.json")):
        result = _json(path, problems)
        if not isinstance(result, dict):
            continue
        points = [{"budget": p.get("budget"), "n": p.get("n"), "accuracy": p["metrics"].get("accuracy"),
                   "mean_tokens": p["metrics"].get("mean_tokens")}
                  for p in result.get("points") or [] if isinstance(p.get("metrics"), dict)]
        series.append({"name": path.parent.name, "points": points})
    return series or None


def _tune(runs_dir: Path, config: dict[str, Any], problems: list[str]) -> dict[str, Any] | None:
    """The run's tune study (`tune.study_name`), read with Optuna from the SQLite file `reasonlite tune` keeps
    beside the runs; a study in a database server (`tune.storage`) is not opened from the console."""
    tune = config.get("tune") if isinstance(config.get("tune"), dict) else {}
    study_name = tune.get("study_name") or "reasonlite"
    db = runs_dir / f"tune-{study_name}" / "study.db"
    if not db.is_file():
        return None
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}", skip_table_creation=True)
        study = optuna.load_study(study_name=study_name, storage=storage)
    except (KeyError, ValueError, RuntimeError, SQLAlchemyError) as e:  # no such study, another Optuna's schema, not a database
        problems.append(f"tune-{study_name}/study.db cannot be read: {type(e).__name__}: {e}")
        return None
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = {t.number for t in study.best_trials} if done else set()
    objectives = study.metric_names or tune.get("objectives") or [f"objective {i}" for i in
                                                                  range(len(study.directions))]
    return {"study": study_name, "objectives": list(objectives),
            "directions": [d.name.lower() for d in study.directions],
            "trials": [{"number": t.number, "values": t.values, "params": t.params, "pareto": t.number in front}
                       for t in done]}
