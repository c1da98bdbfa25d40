"""`reasonlite tune`: an Optuna study whose parameters are dotted paths of the one config.

Each trial is a full `reasonlite run` (stages shared by hash, so trials that only change training knobs reuse the
trace set). Objectives: maximise accuracy, minimise mean generated tokens (and optionally cost per 1k questions).
Storage is SQLite in the study folder by default; a `postgresql://` URL lets workers on several machines share one
study. Killed workers leave RUNNING trials that the heartbeat marks FAILED when a worker resumes.

Search space YAML:
    params:
      traces.style: {type: categorical, choices: [cot, pal], also: [student.format]}
      train.learning_rate: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      student.lora_r: {type: int, low: 4, high: 32, log: true}
    trials: 20   # optional total cap across all workers
`also` copies the sampled value to other paths that must agree with it (style and format).

Honest counts: each process seeds its sampler from the study name and a fresh draw (or, reproducibly, from `tune.seed`
and the study's trial count), so a resumed study proposes new points instead of replaying the first ones; reports
count distinct evaluated configs; a study remembers the hash of its base config and refuses to continue under
another one (its trials would describe a config that best.yaml no longer is).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from reasonlite.config import (
    LATE_STUDY_KNOBS,
    ConfigError,
    ReasonLiteConfig,
    _did_you_mean,
    build_config,
    current_name,
    drop_late_defaults,
    format_validation_error,
    get_dotted,
    hash_names,
)

console = Console()


class ParamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["categorical", "int", "float"]
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    also: list[str] = Field(default_factory=list, description="other dotted paths set to the same value")


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: dict[str, ParamSpec]
    trials: int | None = Field(None, ge=1, description="total trials across all workers (None = each worker's --trials)")


def load_space(path: Path, base: ReasonLiteConfig) -> SearchSpace:
    if not Path(path).exists():
        raise ConfigError(f"search space {path} does not exist; see examples/tune_space.yaml")
    try:
        space = SearchSpace.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"search space {path}", schema=SearchSpace,
                                                  listing="see examples/tune_space.yaml")) from None
    dumped = base.model_dump()
    for name, spec in space.params.items():
        for dotted in (name, *spec.also):
            try:
                get_dotted(dumped, current_name(dotted))
            except (KeyError, AttributeError, TypeError):
                hint = _did_you_mean(tuple(dotted.split(".")))
                fix = f"did you mean `{dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''}{hint}`?" if hint else \
                    "use dotted paths shown by `reasonlite config show`"
                raise ConfigError(f"search space {path}: '{dotted}' is not a config field ({fix})") from None
        if spec.type == "categorical" and not spec.choices:
            raise ConfigError(f"search space {path}: {name} is categorical and needs `choices`")
        if spec.type in ("int", "float") and (spec.low is None or spec.high is None or spec.low > spec.high):
            raise ConfigError(f"search space {path}: {name} needs low <= high")
    return space


def suggest(trial, space: SearchSpace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, spec in space.params.items():
        if spec.type == "categorical":
            value = trial.suggest_categorical(name, spec.choices)
        elif spec.type == "int":
            value = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
        else:
            value = trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)
        for dotted in (name, *spec.also):
            overrides[dotted] = value
    return overrides


def _sampler(name: str, seed: int):
    import optuna

    return {"nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[name]()


def study_dir(cfg: ReasonLiteConfig) -> Path:
    return Path(cfg.runs_dir) / f"tune-{cfg.tune.study_name}"


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
PICKS = ("accuracy", "tokens", "knee")


def check_storage_url(url: str) -> None:
    """Refuse a storage URL Optuna cannot open before sqlalchemy turns it into a traceback."""
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(f"--storage {url}: unsupported URL scheme {scheme or '(none)'!r}; use "
                          "sqlite:///path/study.db or postgresql://user@host:5432/dbname")


def base_config_hash(cfg: ReasonLiteConfig) -> str:
    """Hash of the config a study searches around (its name, folder and tune section aside)."""
    data = hash_names(cfg.model_dump(mode="json"))  # a renamed knob hashes under its old name: studies resume
    drop_late_defaults(data, LATE_STUDY_KNOBS)
    for key in ("name", "runs_dir", "tune"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def sampler_seed(cfg: ReasonLiteConfig, n_trials: int, shared: bool) -> int:
    """tune.seed set: derived from it, the study and its trial count (reproducible, yet new points on resume; a
    shared remote study also mixes in the pid so workers started together differ). Unset: a fresh draw."""
    if cfg.tune.seed is None:
        blob = f"{cfg.tune.study_name}:{secrets.randbits(64)}"
    else:
        blob = f"{cfg.tune.study_name}:{cfg.tune.seed}:{n_trials}:{os.getpid() if shared else ''}"
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16)


def storage_url(cfg: ReasonLiteConfig, storage: str | None = None) -> str:
    """The study's storage: `--storage`, else `tune.storage`, else SQLite in the study's run folder."""
    return storage or cfg.tune.storage or f"sqlite:///{(study_dir(cfg) / 'study.db').resolve()}"


def open_study(cfg: ReasonLiteConfig, storage: str | None = None):

    folder = study_dir(cfg)
    url = storage_url(cfg, storage)
    check_storage_url(url)
    folder.mkdir(parents=True, exist_ok=True)
    heartbeat = int(os.environ.get("REASONLITE_TUNE_HEARTBEAT_S", "30"))
    rdb = rdb_storage(url, heartbeat)
    directions = ["maximize" if o == "accuracy" else "minimize" for o in cfg.tune.objectives]
    study = create_or_load_study(rdb, cfg.tune.study_name, directions, url)
    want = base_config_hash(cfg)
    have = study.user_attrs.get("base_config_hash")
    if have is None:
        study.set_user_attr("base_config_hash", want)
    elif have != want:
        raise ConfigError(f"tune.study_name '{cfg.tune.study_name}' in {url} was started from a different base "
                          f"config (hash {have}, this one {want}); restore that config, or start a new study with "
                          f"--set tune.study_name={cfg.tune.study_name}-2")
    seed = sampler_seed(cfg, len(study.get_trials(deepcopy=False)), shared=not url.startswith("sqlite"))
    study.sampler = _sampler(cfg.tune.sampler, seed)
    return study


def create_or_load_study(rdb, name: str, directions: list[str], url: str):
    """The study `name` in `rdb`, created if missing; retried because workers started together race on creating it."""
    import optuna

    for attempt in range(5):
        try:
            return optuna.create_study(study_name=name, storage=rdb, directions=directions, load_if_exists=True)
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it between check and insert
            time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"tune: could not create or load study '{name}' in {url}")


def rdb_storage(url: str, heartbeat: int):
    """RDBStorage with heartbeats; retried because workers started together race on creating the tables."""
    import warnings

    import optuna
    from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError, ProgrammingError

    # heartbeats have been "experimental" since Optuna 2.8; the warning is noise on every tune run
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=heartbeat * 2,
                # A trial that died with its worker is marked FAILED and run again by the next worker.
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                engine_kwargs={"pool_pre_ping": True} if url.startswith("postgresql") else {},
            )
        except (IntegrityError, ProgrammingError) as exc:  # CREATE TABLE raced with another worker's
            last = exc
            time.sleep(0.5 * (attempt + 1))
        except OperationalError as exc:
            if "already exists" in str(exc.orig):  # SQLite reports that CREATE TABLE race this way
                last = exc
                time.sleep(0.5 * (attempt + 1))
                continue
            raise RuntimeError(f"--storage {url}: cannot connect ({exc.orig}); check host, port, user and that "
                               "the database exists") from exc
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise ConfigError(f"--storage {url}: not a usable database URL ({exc}); use sqlite:///path/study.db "
                              "or postgresql://user@host:5432/dbname") from None
    raise last


def fail_trials_dead_before_first_heartbeat(study) -> int:
    """Fail (and so retry) RUNNING trials that never beat, once they are older than the grace period.

    Optuna's stale check only looks at trials with a heartbeat row, and a trial gets its first one just after
    `study.ask()` created it RUNNING: a worker killed in that window would leave a RUNNING trial that no later worker
    ever fails or retries. Optuna has no public call for this, so the heartbeat table is read directly."""
    from datetime import datetime, timedelta

    import optuna
    from sqlalchemy import text

    storage = study._storage  # Optuna wraps the RDBStorage in a cache; the database is read behind it
    rdb = getattr(storage, "_backend", storage)
    if not isinstance(rdb, optuna.storages.RDBStorage) or rdb.heartbeat_interval is None:
        return 0
    grace = timedelta(seconds=rdb.grace_period or 2 * rdb.heartbeat_interval)
    running = rdb.get_all_trials(study._study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return 0
    with rdb.engine.connect() as conn:
        beaten = {row[0] for row in conn.execute(text("SELECT trial_id FROM trial_heartbeats"))}
    failed = 0
    for trial in running:  # datetime_start is the creating worker's datetime.now(), like the comparison
        if trial._trial_id in beaten or datetime.now() - trial.datetime_start <= grace:
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                failed += 1
                storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            pass
    return failed


def _objective_values(cfg: ReasonLiteConfig, metrics: dict) -> list[float]:
    """Objectives are read off the student's results on the first eval split."""
    split = next(iter(metrics["splits"].values()))
    student = split["student"]
    values = []
    for objective in cfg.tune.objectives:
        if objective == "accuracy":
            values.append(student["accuracy"])
        elif objective == "mean_tokens":
            values.append(student["mean_tokens"])
        else:
            # cost of 1k questions = 1k x mean tokens / 1k x price per 1k tokens
            values.append(student["mean_tokens"] * cfg.tune.cost_per_1k_tokens)
    return values


def make_objective(base: ReasonLiteConfig, space: SearchSpace, total: int | None = None):
    from reasonlite.pipeline import run_pipeline

    base_data = base.model_dump(mode="json")
    started = [0]

    def objective(trial) -> list[float]:
        overrides = suggest(trial, space)
        started[0] += 1
        console.print(f"[bold]trial {started[0]}/{total or '?'}[/bold] (study trial #{trial.number}) "
                      f"{json.dumps(trial.params)}", highlight=False)
        overrides["name"] = f"tune-{base.tune.study_name}/trial-{trial.number:04d}"
        trial.set_user_attr("overrides", overrides)
        try:
            cfg = build_config(base_data, overrides, source=f"trial {trial.number}")
            result = run_pipeline(cfg)
        except Exception as e:  # recorded on the trial, never fatal for the study
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            console.print(f"[red]trial {trial.number} failed[/red]: {type(e).__name__}: {e}")
            raise
        trial.set_user_attr("run_dir", str(result.run_dir))
        return _objective_values(cfg, result.metrics)

    return objective


def pick_trial(study, objectives: list[str], pick: str):
    """accuracy: most accurate; tokens: fewest tokens; knee: the Pareto point farthest from the line joining the
    two extremes (normalised), i.e. the best trade-off."""
    front = study.best_trials
    if not front:
        return None
    acc_i = objectives.index("accuracy") if "accuracy" in objectives else None
    tok_i = objectives.index("mean_tokens") if "mean_tokens" in objectives else None
    if pick == "accuracy" or tok_i is None:
        return max(front, key=lambda t: (t.values[acc_i], -t.values[tok_i] if tok_i is not None else 0))
    if pick == "tokens" or acc_i is None:
        return min(front, key=lambda t: (t.values[tok_i], -t.values[acc_i] if acc_i is not None else 0))
    pts = [(t.values[acc_i], t.values[tok_i]) for t in front]
    a_lo, a_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    k_lo, k_hi = min(p[1] for p in pts), max(p[1] for p in pts)

    def norm(p):
        return ((p[0] - a_lo) / ((a_hi - a_lo) or 1), 1 - (p[1] - k_lo) / ((k_hi - k_lo) or 1))

    # In normalised space both axes are "higher is better"; the knee maximises the sum (distance to the x+y=1 line).
    return max(front, key=lambda t: sum(norm((t.values[acc_i], t.values[tok_i]))))


def write_outputs(cfg: ReasonLiteConfig, study, pick: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    folder = study_dir(cfg)
    objectives = list(cfg.tune.objectives)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    distinct = len({json.dumps(t.params, sort_keys=True) for t in done})  # a re-proposed config is one config
    front = study.best_trials if done else []
    lines = [f"# Tuning study `{cfg.tune.study_name}`", "",
             (f"{distinct} distinct configs evaluated ({len(done)} complete trials), {len(failed)} failed trials. "
              f"Objectives: {', '.join(objectives)}."), "",
             "## Pareto front", "", "| trial | " + " | ".join(objectives) + " | params |",
             "|---|" + "---|" * len(objectives) + "---|"]
    for t in sorted(front, key=lambda t: t.values[0], reverse=True):
        vals = " | ".join(f"{v:.4g}" for v in t.values)
        lines.append(f"| {t.number} | {vals} | `{json.dumps(t.params)}` |")
    if failed:
        lines += ["", "## Failed trials", "", "| trial | error |", "|---|---|"]
        lines += [f"| {t.number} | {t.user_attrs.get('error', '(worker died)')} |" for t in failed]
    (folder / "pareto.md").write_text("\n".join(lines) + "\n")

    if done and len(objectives) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], c="lightgray", label="trials")
        ax.scatter([t.values[1] for t in front], [t.values[0] for t in front], c="crimson", label="Pareto front")
        ax.set_xlabel(objectives[1])
        ax.set_ylabel(objectives[0])
        ax.set_title(f"study {cfg.tune.study_name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=120)
        plt.close(fig)

    chosen = pick_trial(study, objectives, pick) if front else None
    summary = {"complete": distinct, "complete_trials": len(done), "failed": len(failed),
               "pareto": [t.number for t in front],
               "picked": chosen.number if chosen else None, "pick": pick}
    if chosen is not None:
        best = build_config(cfg.model_dump(mode="json"),
                            {k: v for k, v in chosen.user_attrs["overrides"].items() if k != "name"})
        best_path = folder / "best.yaml"
        best_path.write_text(f"# picked by --pick {pick}: trial {chosen.number}, values {chosen.values}\n"
                             + yaml.safe_dump(best.model_dump(mode="json"), sort_keys=False))
        summary["best_yaml"] = str(best_path)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_study(cfg: ReasonLiteConfig, space: SearchSpace, trials: int, storage: str | None = None):
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(cfg, storage)
    callbacks = []
    if space.trials:
        # The cap counts completed trials: a trial that failed (or died with its worker) is retried, not counted.
        callbacks.append(MaxTrialsCallback(space.trials, states=(TrialState.COMPLETE,)))
        done = len([t for t in study.trials if t.state == TrialState.COMPLETE])
        trials = min(trials, max(space.trials - done, 0))
    fail_trials_dead_before_first_heartbeat(study)
    if trials:
        study.optimize(make_objective(cfg, space, trials), n_trials=trials, callbacks=callbacks, catch=(Exception,),
                       gc_after_trial=True)
    return study


def tune_command(cfg: ReasonLiteConfig, space: Path, trials: int, storage: str | None, pick: str | None) -> dict:
    if trials < 0:
        raise ConfigError(f"--trials {trials}: must be >= 0 (0 only rewrites the reports)")
    if pick is not None and pick not in PICKS:
        raise ConfigError(f"--pick {pick}: use one of {', '.join(PICKS)}")
    if storage is not None:
        check_storage_url(storage)
    parsed = load_space(space, cfg)
    study = run_study(cfg, parsed, trials, storage)
    summary = write_outputs(cfg, study, pick or cfg.tune.pick)
    table = Table(title=f"Pareto front — study {cfg.tune.study_name}")
    table.add_column("trial")
    for o in cfg.tune.objectives:
        table.add_column(o, justify="right")
    table.add_column("params")
    for t in sorted(study.best_trials, key=lambda t: t.values[0], reverse=True):
        table.add_row(str(t.number), *[f"{v:.4g}" for v in t.values], json.dumps(t.params))
    console.print(table)
    folder = study_dir(cfg)
    console.print(f"{summary['complete']} distinct configs evaluated ({summary['complete_trials']} complete "
                  f"trials), {summary['failed']} failed. Report: {folder / 'pareto.md'}, "
                  f"plot: {folder / 'pareto.png'}, best: {summary.get('best_yaml')}")
    return summary
