"""`slm-fusion merge-tune`: Optuna over merge settings, scored on dev sets, resumable, killed trials retried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from optuna_helpers import age_running_heartbeats, wait_for_a_running_trial
from typer.testing import CliRunner

from slm_fusion.cli import app
from slm_fusion.merging import tune as merge_tune_mod
from slm_fusion.merging.config import load_merge_config


@pytest.fixture(scope="module")
def specialists(tmp_path_factory):
    """The tiny random model as base, and two 'specialists': the base with two different small perturbations."""
    from reasonlite.models import load_model

    root = tmp_path_factory.mktemp("merge-tune")
    model, tokenizer = load_model("tiny-random-llama")
    folders = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        folders[name] = root / name
        model.save_pretrained(folders[name], safe_serialization=True)
        tokenizer.save_pretrained(folders[name])
    return folders


def _task(path, k0):
    rows = [{"question": f"A box holds {k} apples and {k + 1} pears. How many fruits?", "answer": str(2 * k + 1)}
            for k in range(k0, k0 + 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _files(tmp_path, specialists, trials=3):
    models = []
    for i, name in enumerate(("a", "b")):
        models.append({"model": str(specialists[name]), "eval": {
            "data": _task(tmp_path / f"test{i}.jsonl", 10 * i), "dev": _task(tmp_path / f"dev{i}.jsonl", 50 + i),
            "format": "pal", "budget": 8}})
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(specialists["base"]),
                                      "models": models}))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"methods": ["task_arithmetic", "ties"], "gradient": True, "trials": trials,
                                     "dev_limit": 3}))
    return config, space


def test_merge_tune_searches_resumes_within_its_cap_and_writes_a_mergeable_best(specialists, tmp_path, monkeypatch):
    config, space = _files(tmp_path, specialists)
    scored = []
    real = merge_tune_mod.TaskScorer.score_task

    def counting(self, index, model):
        scored.append((index, str(model)))
        return real(self, index, model)

    monkeypatch.setattr(merge_tune_mod.TaskScorer, "score_task", counting)
    out = tmp_path / "study"
    runner = CliRunner()
    first = runner.invoke(app, ["merge-tune", str(config), "--space", str(space), "--out", str(out), "--trials", "2"])
    assert first.exit_code == 0, first.output
    # two specialists on their own dev sets once, then each trial's merge on both tasks
    assert [i for i, m in scored[:2]] == [0, 1] and str(specialists["a"]) == scored[0][1]
    assert len(scored) == 2 + 2 * 2
    scored.clear()
    second = runner.invoke(app, ["merge-tune", str(config), "--space", str(space), "--out", str(out), "--trials", "5"])
    assert second.exit_code == 0, second.output
    assert len(scored) == 2  # the cap of 3 completed trials leaves one; the specialists are not scored again
    assert all("trial-" in m for _, m in scored)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete_trials"] == 3 and summary["failed"] == 0
    assert len(summary["specialist_dev_accuracy"]) == 2
    for t in summary["trials"]:
        assert len(t["normalised"]) == 2 and t["params"]["method"] in ("task_arithmetic", "ties")
        spec = summary["specialist_dev_accuracy"]
        assert t["normalised"] == [a / s if s > 0 else a for a, s in zip(t["dev_accuracy"], spec, strict=True)]
    assert "| trial |" in (out / "pareto.md").read_text()
    assert not list((out / "trials").glob("*/model"))  # merged models are deleted after scoring

    best = load_merge_config(out / "best_merge.yaml")  # a valid merge YAML ...
    assert best.merge_method in ("task_arithmetic", "ties")
    assert isinstance(best.models[0].parameters["weight"], list)  # gradient: [first layer, last layer]
    assert best.models[1].eval.dev.endswith("dev1.jsonl")
    merged = tmp_path / "best-model"
    done = runner.invoke(app, ["merge", str(out / "best_merge.yaml"), str(merged), "--no-progress"])
    assert done.exit_code == 0, done.output  # ... that `slm-fusion merge` takes as it is
    assert (merged / "config.json").exists()


def test_merge_tune_bad_inputs_are_one_line(specialists, tmp_path):
    config, space = _files(tmp_path, specialists)
    runner = CliRunner()
    bad_space = tmp_path / "bad.yaml"
    bad_space.write_text(yaml.safe_dump({"methods": ["tie"]}))
    result = runner.invoke(app, ["merge-tune", str(config), "--space", str(bad_space), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "methods" in result.stderr and "ties" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    cfg = yaml.safe_load(config.read_text())
    del cfg["models"][1]["eval"]["dev"]
    config.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["merge-tune", str(config), "--space", str(space), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "models[1].eval.dev" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_merge_tune_killed_mid_trial_resumes_and_retries_that_trial(specialists, tmp_path):
    config, space = _files(tmp_path, specialists, trials=2)
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "slm_fusion.cli", "merge-tune", str(config), "--space", str(space), "--out",
           str(out), "--trials", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "REASONLITE_TUNE_HEARTBEAT_S": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    db = out / "study.db"
    wait_for_a_running_trial(db, proc, poll_s=0.2)  # SIGKILL once the first trial runs with a heartbeat
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert age_running_heartbeats(db) == 1  # stale now, instead of waiting out the grace period
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    study = optuna.load_study(study_name="merge-tune", storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    killed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # retried with the parameters it had drawn when it died (a trial draws its method first, the rest as it builds)
    assert len(complete) == 2 and any(killed.params.items() <= t.params.items() for t in complete)
    assert killed.params
    assert json.loads((out / "summary.json").read_text())["complete_trials"] == 2
