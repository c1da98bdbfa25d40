"""Shared test setup: offline, few threads (the CI machine has 2 cores), shared data located beside the repo."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").exists():
        pytest.fail(f"shared data not found at {SHARED_DATA}: the repo must sit beside shared/ (as in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="module")
def upstream():
    """The mock OpenAI-compatible upstream on a real 127.0.0.1 port (`.mock` records what it was sent)."""
    from gateway_helpers import serve

    from slm_fusion.backends.mock_upstream import MockUpstream

    mock = MockUpstream()
    with serve(mock) as served:
        served.mock = mock
        yield served


@pytest.fixture(scope="module")
def loop():
    """One event loop per test module, for tests that drive a backend's async API directly."""
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
