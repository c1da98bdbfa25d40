"""`reasonlite dashboard`: the real optuna-dashboard over a real SQLite study, fetched over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import optuna
import pytest
import yaml
from typer.testing import CliRunner

from reasonlite.cli import app
from reasonlite.config import load_config
from reasonlite.dashboard import resolve_storage
from reasonlite.tune import open_study

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def study_db(tmp_path) -> Path:
    db = tmp_path / "study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="lr-search", storage=f"sqlite:///{db}", direction="maximize")
    study.optimize(lambda t: t.suggest_float("train.learning_rate", 1e-4, 1e-2, log=True), n_trials=2)
    return db


def test_dashboard_serves_the_study_over_http_and_stops_on_ctrl_c(study_db, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    # stderr goes to a file, not an unread pipe: a child whose stderr pipe fills blocks writing (or flushing at exit)
    err = open(tmp_path / "dashboard.stderr", "w+")  # noqa: SIM115 — closed below, read on failure
    # started with SIGINT ignored (inherited across exec), as a launcher or a shell's background job may hand it
    # over (the full test suite did): Ctrl-C must still stop it
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "reasonlite.cli", "dashboard", str(study_db), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        line = proc.stdout.readline()  # printed once the socket is bound: no waiting on a clock
        assert "optuna-dashboard for sqlite:///" in line, (line, (tmp_path / "dashboard.stderr").read_text())
        url = line.split(" at ")[1].strip()
        base = url.removesuffix("/dashboard")
        studies = httpx.get(f"{base}/api/studies", timeout=30).json()["study_summaries"]
        assert [s["study_name"] for s in studies] == ["lr-search"]
        detail = httpx.get(f"{base}/api/studies/{studies[0]['study_id']}", timeout=30).json()
        assert len(detail["trials"]) == 2
        assert {p["name"] for t in detail["trials"] for p in t["params"]} == {"train.learning_rate"}
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the dashboard did not stop on Ctrl-C; its stderr: "
                        + (tmp_path / "dashboard.stderr").read_text()[-2000:])
        finally:
            err.close()
    assert code == 0


def test_default_storage_is_the_one_tune_uses(tmp_path, monkeypatch):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"runs_dir": str(tmp_path / "runs"), "tune": {"study_name": "s1"}}))
    cfg = load_config(config)
    open_study(cfg)  # what `reasonlite tune` opens: creates runs/tune-s1/study.db
    assert resolve_storage(str(config)) == f"sqlite:///{(tmp_path / 'runs' / 'tune-s1' / 'study.db').resolve()}"
    monkeypatch.chdir(tmp_path)  # no argument: the default config's study, runs/tune-reasonlite/study.db
    with pytest.raises(FileNotFoundError, match="tune-reasonlite"):
        resolve_storage(None)
    assert resolve_storage(None, {"tune.study_name": "s1"}).endswith("runs/tune-s1/study.db")


@pytest.mark.parametrize(("arg", "code", "words"), [
    ("mongodb://host/db", 2, ["unsupported URL scheme"]),
    ("{d}/missing.db", 3, ["missing.db", "reasonlite tune"]),
    ("{d}/notes.txt", 2, ["STORAGE", ".db file or a config YAML"]),
])
def test_bad_storage_is_one_line(tmp_path, arg, code, words):
    result = CliRunner().invoke(app, ["dashboard", arg.format(d=tmp_path), "--port", "0"])
    err = result.stderr.strip()
    assert result.exit_code == code, err
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
