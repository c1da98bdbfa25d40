"""Crash safety: real child processes killed with SIGKILL at chosen points, then rerun.

- during a checkpoint write (HF Trainer's save is paused half-way by a patched `_save_rng_state`, then the process is
  killed): the rerun skips the half-written checkpoint with a notice and finishes from the previous one;
- during a tune trial: the killed trial is failed by the heartbeat and retried, no config is counted twice;
- a command with a changed knob never writes into the completed stage folder of another config.
"""

from __future__ import annotations

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
from optuna_helpers import age_running_heartbeats, wait_for_a_running_trial

from reasonlite.config import ConfigError, build_config, load_config
from reasonlite.pipeline import run_stage, stage_folder
from reasonlite.traces import Trace
from reasonlite.train.sft import checkpoint_problem, last_checkpoint
from reasonlite.tune import open_study, sampler_seed

# A `reasonlite` process whose checkpoint save pauses (after weights and optimizer, before the RNG state and
# trainer_state.json) at step $PAUSE_AT_STEP, announcing it in $PAUSE_FLAG: the test kills it right there.
CHILD = """
import os, signal, sys
from pathlib import Path
import transformers

original = transformers.Trainer._save_rng_state

def paused(self, output_dir):
    if os.environ.get("PAUSE_AT_STEP") and self.state.global_step == int(os.environ["PAUSE_AT_STEP"]):
        Path(os.environ["PAUSE_FLAG"]).write_text(output_dir)
        signal.pause()  # held mid-save until the test's SIGKILL arrives
    return original(self, output_dir)

transformers.Trainer._save_rng_state = paused
from reasonlite.cli import app
app(sys.argv[1:], prog_name="reasonlite")
"""

TRAIN = {"student": {"model": "tiny-random-llama", "lora_r": 4, "lora_alpha": 8},
         "train": {"max_steps": 4, "save_steps": 2, "batch_size": 2, "max_length": 384, "learning_rate": 1e-2}}


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def _cli(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run([sys.executable, str(script), *args], env=_env(**env), capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, check=False)


@pytest.fixture(scope="module")
def trace_set(tmp_path_factory) -> Path:
    """Eight verified PAL traces, written directly (a trace-set folder as `reasonlite traces` leaves it)."""
    folder = tmp_path_factory.mktemp("traces")
    traces = []
    for i in range(8):
        a, b = 3 + i, 10 + 2 * i
        program = f"def solution():\n    apples = {a}\n    pears = {b}\n    return apples + pears"
        traces.append(Trace(id=f"q{i}#0", example_id=f"q{i}", question=f"Ann has {a} apples and {b} pears. How many "
                            "fruits does she have?", gold=str(a + b), label=str(a + b), domain="retail", style="pal",
                            text=program, status="correct", answer=str(a + b), rationale=None, program=program))
    (folder / "traces.jsonl").write_text("".join(t.model_dump_json() + "\n" for t in traces))
    (folder / "pairs.jsonl").write_text("")
    (folder / "manifest.json").write_text(json.dumps({"counts": {"selected": len(traces)}}))
    return folder


def _config(tmp_path: Path, **train) -> Path:
    data = json.loads(json.dumps(TRAIN))
    data["train"].update(train)
    data.update(name="crash", runs_dir=str(tmp_path / "runs"))
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------------ checkpoints
def test_kill_during_checkpoint_write_resumes_from_the_previous_complete_one(tmp_path, trace_set):
    cfg_path = _config(tmp_path)
    cfg = load_config(cfg_path)
    out = stage_folder(cfg, "train")
    flag = tmp_path / "paused"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), "train", str(cfg_path), "--traces", str(trace_set)],
                            env=_env(PAUSE_AT_STEP="4", PAUSE_FLAG=str(flag)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 400
    while not flag.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the save never reached the pause point"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = out / "checkpoints"
    assert checkpoint_problem(ckpts / "checkpoint-2") is None
    assert checkpoint_problem(ckpts / "checkpoint-4") == "no trainer_state.json"  # really half-written
    assert not (out / ".stage-complete").exists()

    # without --resume or --fresh: refused in one line, nothing deleted
    refused = _cli(tmp_path, "train", str(cfg_path), "--traces", str(trace_set))
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--fresh" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and (ckpts / "checkpoint-2").is_dir()

    resumed = _cli(tmp_path, "train", str(cfg_path), "--traces", str(trace_set), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    printed = resumed.stdout.replace("\n", "")  # rich folds long paths
    assert "skipping incomplete checkpoint-4" in printed
    assert "resuming from" in printed and "checkpoint-2" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert [h["step"] for h in metrics["loss_history"]] == [1, 2, 3, 4]  # nothing lost, nothing twice
    assert checkpoint_problem(ckpts / "checkpoint-4") is None and (out / ".stage-complete").exists()
    assert (out / "model" / "config.json").exists()
    assert (Path(cfg.runs_dir) / cfg.name / "train").resolve() == out.resolve()


def test_empty_or_truncated_checkpoints_are_skipped(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    good = ckpts / "checkpoint-10"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    import torch

    (good / "adapter_model.safetensors").write_bytes(b"")  # replaced below by a valid file
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(good / "adapter_model.safetensors"))
    torch.save({"a": 1}, good / "optimizer.pt")
    torch.save({"b": 2}, good / "scheduler.pt")
    (ckpts / "checkpoint-30").mkdir()  # empty: killed right after mkdir
    truncated = ckpts / "checkpoint-20"
    truncated.mkdir()
    for f in good.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    (truncated / "optimizer.pt").write_bytes((good / "optimizer.pt").read_bytes()[:40])
    assert last_checkpoint(ckpts) == str(good)
    notices = capsys.readouterr().out
    assert "checkpoint-30" in notices and "checkpoint-20" in notices and "optimizer.pt" in notices
    assert not (ckpts / "checkpoint-20").exists() and not (ckpts / "checkpoint-30").exists()


# ------------------------------------------------------------------------------------------------ stage folders
def test_a_changed_knob_never_writes_into_another_configs_stage(tmp_path, trace_set):
    cfg_path = _config(tmp_path, max_steps=2)
    cfg = load_config(cfg_path)
    cached = stage_folder(cfg, "train")

    def fake_training(folder: Path) -> None:  # stands for the `run` that trained and cached this config
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "weights").write_text("the 2-step model")

    run_stage(cfg, "train", fake_training)
    before = sorted(p.relative_to(cached) for p in cached.rglob("*"))

    changed = _cli(tmp_path, "train", str(cfg_path), "--traces", str(trace_set), "--set", "train.max_steps=1")
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert sorted(p.relative_to(cached) for p in cached.rglob("*")) == before  # untouched
    assert (cached / "model" / "weights").read_text() == "the 2-step model"
    own = stage_folder(load_config(cfg_path, {"train.max_steps": 1}), "train")
    assert own != cached and (own / "model" / "config.json").exists()
    link = Path(cfg.runs_dir) / cfg.name / "train"
    assert link.is_symlink() and link.resolve() == own.resolve()

    # the original config again: its complete stage is reused, not retrained, and the link points back
    again = _cli(tmp_path, "train", str(cfg_path), "--traces", str(trace_set))
    assert again.returncode == 0 and "reusing" in again.stdout
    assert link.resolve() == cached.resolve()
    assert (cached / "model" / "weights").read_text() == "the 2-step model"


# ------------------------------------------------------------------------------------------------ tuner
TUNE_BASE = {
    "name": "tiny",
    "data": {"source": "retail_math", "n_train": 12, "n_test": 3, "n_test_heldout_templates": 1},
    "teacher": {"kind": "dataset"},
    "student": {"model": "tiny-random-llama", "format": "pal", "lora_r": 4},
    "train": {"max_steps": 1, "batch_size": 4, "max_length": 512, "save_steps": 100},
    "eval": {"splits": ["test"], "limit": 2, "max_new_tokens": 8, "compare_base": False, "batch_size": 4},
}
SPACE = {"params": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}


def _tune_files(tmp_path: Path, study: str, **tune) -> tuple[Path, Path]:
    cfg = {**json.loads(json.dumps(TUNE_BASE)), "runs_dir": str(tmp_path / "runs"),
           "tune": {"study_name": study, "sampler": "random", **tune}}
    cfg_path, space_path = tmp_path / f"{study}.yaml", tmp_path / f"{study}-space.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    space_path.write_text(yaml.safe_dump(SPACE))
    return cfg_path, space_path


def test_sampler_seed_is_fresh_per_process_and_reproducible_with_tune_seed():
    free, fixed = build_config({}), build_config({"tune": {"seed": 7}})
    assert sampler_seed(free, 0, shared=False) != sampler_seed(free, 0, shared=False)
    assert sampler_seed(fixed, 0, shared=False) == sampler_seed(fixed, 0, shared=False)
    assert sampler_seed(fixed, 0, shared=False) != sampler_seed(fixed, 1, shared=False)  # a resume draws anew


def test_study_refuses_a_different_base_config(tmp_path):
    cfg_path, _ = _tune_files(tmp_path, "based")
    cfg = load_config(cfg_path)
    open_study(cfg)
    open_study(load_config(cfg_path, {"tune.pick": "accuracy"}))  # the tune section is not the base
    with pytest.raises(ConfigError, match="different base config.*tune.study_name=based-2"):
        open_study(load_config(cfg_path, {"train.max_steps": 3}))


def test_kill_during_a_tune_trial_then_resume_counts_each_config_once(tmp_path):
    cfg_path, space_path = _tune_files(tmp_path, "crash")
    cfg = load_config(cfg_path)
    cmd = [sys.executable, "-m", "reasonlite.cli", "tune", str(cfg_path), "--space", str(space_path)]
    env = _env(REASONLITE_TUNE_HEARTBEAT_S="1")
    proc = subprocess.Popen([*cmd, "--trials", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    db = tmp_path / "runs" / "tune-crash" / "study.db"
    # SIGKILL while the first trial runs: RUNNING, its parameters drawn and its heartbeat beating (a kill before the
    # first beat is test_tune.py::test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried)
    wait_for_a_running_trial(db, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The dead trial's last heartbeat, moved an hour back (instead of waiting out the 2 x 1 s grace): it is stale.
    moved = age_running_heartbeats(db)
    assert moved == 1
    out = subprocess.run([*cmd, "--trials", "2"], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "trial 1/2" in out.stdout and "trial 2/2" in out.stdout
    study = open_study(cfg)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.FAIL in states  # the killed trial, failed by the heartbeat ...
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    killed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    assert any(t.params == killed.params for t in complete)  # ... and retried with its parameters
    assert len(complete) == 2
    summary = json.loads((tmp_path / "runs" / "tune-crash" / "summary.json").read_text())
    assert summary["complete"] == len({json.dumps(t.params, sort_keys=True) for t in complete})
    assert summary["complete_trials"] == 2
