"""`reasonlite run`: traces -> train -> eval -> export in one run folder, with stage caching by config hash.

The teacher is a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/teacher_server.py) that counts requests,
so "changing only the learning rate makes zero teacher calls" is asserted by the server's own counter.
"""

import json
import sys
from pathlib import Path

import pytest

from reasonlite.config import build_config
from reasonlite.data.retail_math import retail_math_splits
from reasonlite.pipeline import run_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from teacher_server import ServerState, ThreadedServer


def _config(tmp_path: Path, base_url: str, **train):
    return build_config({
        "name": "pipe",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"source": "retail_math", "n_train": 8, "n_test": 3, "n_test_heldout_templates": 2},
        "teacher": {"kind": "openai", "base_url": base_url, "model": "teacher-1", "concurrency": 4,
                    "temperature": 0.0},
        "student": {"model": "tiny-random-llama", "format": "pal", "lora_r": 4},
        "train": {"max_steps": 2, "batch_size": 4, "max_length": 256, "save_steps": 100, **train},
        "eval": {"splits": ["test", "test_heldout_templates"], "max_new_tokens": 12, "compare_base": True,
                 "batch_size": 4},
    })


@pytest.fixture()
def teacher():
    splits = retail_math_splits(8, 3, seed=0, n_test_heldout=2)
    script = {e.question: [f"```python\n{e.program}\n```"] for e in splits["train"]}
    state = ServerState(script=script)
    with ThreadedServer(state) as server:
        yield state, server.base_url


def test_run_then_change_only_lr_reuses_traces_without_teacher_calls(tmp_path, teacher):
    state, base_url = teacher
    first = run_pipeline(_config(tmp_path, base_url))
    assert first.stages == {"traces": "ran", "train": "ran", "eval": "ran"}
    calls_after_first = state.requests
    assert calls_after_first == 8  # one request per training question (k=1)

    run_dir = tmp_path / "runs" / "pipe"
    for name in ("config.yaml", "pipeline.json", "serve.yaml", "traces", "train", "eval"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "train" / "model" / "config.json").exists()
    assert (run_dir / "eval" / "report.md").exists()
    metrics = json.loads((run_dir / "pipeline.json").read_text())["metrics"]
    assert set(metrics["splits"]) == {"test", "test_heldout_templates"}
    assert set(metrics["splits"]["test"]) == {"student", "base"}
    assert metrics["splits"]["test"]["student"]["total"] == 3
    # the exported model's card carries the eval metrics
    assert "accuracy" in (run_dir / "train" / "model" / "README.md").read_text().lower()
    # serve.yaml is a valid gateway config serving the exported student with its reasoning defaults
    from slm_fusion.config import load_fusion_config

    served = load_fusion_config(run_dir / "serve.yaml").models[0]
    assert served.reasoning.format == "pal" and served.reasoning.student_prompt
    assert (Path(served.model) / "config.json").exists()

    manifest = (run_dir / "traces" / "manifest.json").read_text()
    second = run_pipeline(_config(tmp_path, base_url, learning_rate=5e-4))
    assert second.stages["traces"] == "reused" and second.stages["train"] == "ran"
    assert state.requests == calls_after_first, "changing only the learning rate must not call the teacher"
    assert (run_dir / "traces" / "manifest.json").read_text() == manifest
    assert second.stage_dirs["train"] != first.stage_dirs["train"]

    # forcing the traces stage rebuilds it from the SQLite teacher cache: still zero calls
    third = run_pipeline(_config(tmp_path, base_url, learning_rate=5e-4), force=("traces",))
    assert third.stages == {"traces": "ran", "train": "ran", "eval": "ran"}
    assert state.requests == calls_after_first


def test_unknown_force_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--force"):
        run_pipeline(build_config({"runs_dir": str(tmp_path)}), force=("trian",))
