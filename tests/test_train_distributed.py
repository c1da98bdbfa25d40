"""`--nproc N`: data-parallel training under torchrun (gloo on CPU) follows single-process training on the same
global batch, writes the same checkpoints and resumes from them."""

from __future__ import annotations

import json
import shutil

import pytest
from test_train import tiny_cfg, write_trace_set

from reasonlite.train import train_student
from reasonlite.train.distributed import launch

STEPS = 4


def losses(out) -> list[float]:
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["loss_history"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    traces = write_trace_set(d / "traces", n=16, style="pal")
    train = {"max_steps": STEPS, "save_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0}
    single = train_student(tiny_cfg(train={**train, "batch_size": 4}), traces, d / "single")
    two = launch(tiny_cfg(train={**train, "batch_size": 2}), traces, d / "two", nproc=2)
    return d, traces, train, single, two


def test_two_cpu_processes_follow_single_process_training_on_the_same_global_batch(runs):
    d, _, _, single, two = runs
    assert two.steps == single.steps == STEPS
    one, both = losses(d / "single"), losses(d / "two")
    assert len(one) == len(both) == STEPS
    assert one[0] != one[-1]  # the model learns: the curve has a shape to match
    assert both == pytest.approx(one, rel=2e-3), (one, both)
    assert (d / "two" / "model" / "config.json").exists() and (d / "two" / "loss.png").exists()
    def checkpoints(out):
        return sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))

    assert checkpoints(d / "two") == checkpoints(d / "single") == ["checkpoint-2", "checkpoint-4"]


def test_a_two_process_run_resumes_from_its_checkpoint(runs):
    d, traces, train, _, _ = runs
    resumed = d / "resumed"
    shutil.copytree(d / "two", resumed, symlinks=True)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")  # as if killed after the step-2 checkpoint
    for name in ("model", "metrics.json"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = launch(tiny_cfg(train={**train, "batch_size": 2}), traces, resumed, nproc=2, resume=True)
    assert result.steps == STEPS
    assert losses(resumed) == pytest.approx(losses(d / "two"), rel=2e-3)
    assert (resumed / "checkpoints" / "checkpoint-4").is_dir()
