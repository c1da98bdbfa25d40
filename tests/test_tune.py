"""`reasonlite tune` on tiny-random-llama: SQLite study, failed trials recorded, resume after kill, and two workers
sharing one study on a real PostgreSQL server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna_helpers import age_running_heartbeats

from reasonlite.config import build_config, load_config
from reasonlite.tune import fail_trials_dead_before_first_heartbeat, load_space, open_study, run_study, tune_command

sys.path.insert(0, str(Path(__file__).parent))
from pg_server import PostgresServer, find_pg_bin

TINY = {
    "name": "tiny",
    "data": {"source": "retail_math", "n_train": 12, "n_test": 3, "n_test_heldout_templates": 1},
    "teacher": {"kind": "dataset"},
    "student": {"model": "tiny-random-llama", "format": "pal", "lora_r": 4},
    "train": {"max_steps": 2, "batch_size": 4, "max_length": 256, "save_steps": 100},
    "eval": {"splits": ["test"], "limit": 3, "max_new_tokens": 12, "compare_base": False, "batch_size": 4},
}


def _write(tmp_path: Path, study: str, space: dict, storage: str | None = None) -> tuple[Path, Path]:
    cfg = json.loads(json.dumps(TINY))
    cfg["runs_dir"] = str(tmp_path / "runs")
    cfg["tune"] = {"study_name": study, "sampler": "random", **({"storage": storage} if storage else {})}
    cfg_path, space_path = tmp_path / f"{study}.yaml", tmp_path / f"{study}-space.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    space_path.write_text(yaml.safe_dump(space))
    return cfg_path, space_path


SPACE = {"params": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                    "student.lora_r": {"type": "int", "low": 2, "high": 8}}}


def test_space_errors_name_the_path(tmp_path):
    cfg = build_config(TINY)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"params": {"train.learnin_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}}))
    with pytest.raises(ValueError, match="train.learnin_rate"):
        load_space(bad, cfg)


def test_three_trial_study_on_sqlite_writes_pareto_and_best(tmp_path):
    cfg_path, space_path = _write(tmp_path, "sqlite3", SPACE)
    cfg = load_config(cfg_path)
    summary = tune_command(cfg, space=space_path, trials=3, storage=None, pick="knee")
    assert summary["complete"] == 3 and summary["failed"] == 0
    folder = tmp_path / "runs" / "tune-sqlite3"
    assert (folder / "study.db").exists()
    assert "Pareto front" in (folder / "pareto.md").read_text()
    assert (folder / "pareto.png").stat().st_size > 1000
    best = load_config(folder / "best.yaml")  # a valid config a user can `reasonlite run`
    assert best.student.lora_r in range(2, 9)
    # each trial has its own run folder with its resolved config; the trace set is shared (one traces stage)
    trial_dirs = sorted((tmp_path / "runs" / "tune-sqlite3").glob("trial-*"))
    assert len(trial_dirs) == 3 and all((d / "config.yaml").exists() for d in trial_dirs)
    assert len(list((tmp_path / "runs" / "_stages").glob("traces-*"))) == 1


def test_failed_trial_is_recorded_not_fatal(tmp_path):
    space = {"params": {"student.format": {"type": "categorical", "choices": ["pal", "cot"]}}}
    cfg_path, space_path = _write(tmp_path, "failing", space)
    cfg = load_config(cfg_path)
    for fmt in ("cot", "pal"):  # both values tried whatever the sampler draws (4 random draws may all be pal)
        open_study(cfg).enqueue_trial({"student.format": fmt})
    study = run_study(cfg, load_space(space_path, cfg), trials=4)
    states = {t.params["student.format"]: t.state for t in study.trials}
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed, "format cot with pal traces must fail (inconsistent config)"
    assert all("traces.style" in t.user_attrs["error"] for t in failed)
    assert states.get("pal") in (optuna.trial.TrialState.COMPLETE, None)


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(tmp_path, monkeypatch):
    """`study.ask()` creates the trial RUNNING a moment before its heartbeat thread first beats; a worker killed in
    between leaves a trial Optuna's own stale check never sees (it has no heartbeat row)."""
    monkeypatch.setenv("REASONLITE_TUNE_HEARTBEAT_S", "2")
    cfg_path, _ = _write(tmp_path, "unbeaten", SPACE)
    cfg = load_config(cfg_path)
    study = open_study(cfg)
    dead = study.ask({"student.lora_r": optuna.distributions.IntDistribution(2, 8)})  # what a killed worker leaves
    young = fail_trials_dead_before_first_heartbeat(study)
    assert young == 0  # inside the grace period it may be a live worker about to beat: left alone
    assert age_running_heartbeats(tmp_path / "runs" / "tune-unbeaten" / "study.db") == 1
    assert fail_trials_dead_before_first_heartbeat(study) == 1
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == trials[dead.number].params  # the retry callback re-queued it
    assert fail_trials_dead_before_first_heartbeat(study) == 0  # failed once, never twice


def _worker(cfg_path: Path, space_path: Path, trials: int, storage: str | None = None, env_extra=None):
    cmd = [sys.executable, "-m", "reasonlite.cli", "tune", str(cfg_path), "--space", str(space_path),
           "--trials", str(trials)]
    if storage:
        cmd += ["--storage", storage]
    env = {**os.environ, "REASONLITE_TUNE_HEARTBEAT_S": "2", **(env_extra or {})}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_resume_after_kill(tmp_path):
    space = {**SPACE, "trials": 3}
    cfg_path, space_path = _write(tmp_path, "killed", space)
    cfg = load_config(cfg_path)
    proc = _worker(cfg_path, space_path, trials=3)
    study = None
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once a trial completed and the next is running
        time.sleep(1)
        if (tmp_path / "runs" / "tune-killed" / "study.db").exists():
            study = open_study(cfg)
            states = [t.state for t in study.get_trials(deepcopy=False)]
            if optuna.trial.TrialState.COMPLETE in states and optuna.trial.TrialState.RUNNING in states:
                break
        assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The dead worker's last heartbeat, moved an hour back (instead of waiting out the grace period): it is stale.
    moved = age_running_heartbeats(tmp_path / "runs" / "tune-killed" / "study.db")
    assert moved == 1  # the killed trial's (a completed trial keeps its last heartbeat row too)
    out = subprocess.run([sys.executable, "-m", "reasonlite.cli", "tune", str(cfg_path), "--space", str(space_path),
                          "--trials", "5"], check=False, env={**os.environ, "REASONLITE_TUNE_HEARTBEAT_S": "2"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    study = open_study(cfg)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3  # the cap counts completed trials only
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.FAIL in states  # the killed trial, failed by the heartbeat and retried


@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL binaries missing: .ci/run installs them")
def test_two_workers_share_one_postgres_study(tmp_path):
    server = PostgresServer().start()
    try:
        cfg_path, space_path = _write(tmp_path, "shared", SPACE, storage=server.url)
        workers = [_worker(cfg_path, space_path, trials=2) for _ in range(2)]
        outputs = [w.communicate(timeout=900)[0] for w in workers]
        assert all(w.returncode == 0 for w in workers), outputs
        study = optuna.load_study(study_name="shared", storage=server.url)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(study.trials) == 4 and len(complete) == 4
        assert len({t.number for t in complete}) == 4
        run_dirs = {t.user_attrs["run_dir"] for t in complete}
        assert len(run_dirs) == 4 and all(Path(d, "config.yaml").exists() for d in run_dirs)
    finally:
        server.stop()


def test_a_create_table_race_on_sqlite_is_retried_not_reported_as_unreachable(tmp_path, monkeypatch):
    """Two processes opening a new study DB together: SQLite reports the loser's CREATE TABLE as an OperationalError
    ("table ... already exists"), which is a race to retry, not a database that cannot be reached."""
    import sqlalchemy.exc

    from reasonlite import tune

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kw):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE alembic_version", {},
                                                  Exception("table alembic_version already exists"))
        return real(url, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(tune.time, "sleep", lambda s: None)
    storage = tune.rdb_storage(f"sqlite:///{tmp_path / 'race.db'}", heartbeat=2)
    assert len(calls) == 2 and storage.heartbeat_interval == 2
