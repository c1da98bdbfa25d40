"""Helpers for the gateway tests: run ASGI apps under a real uvicorn on 127.0.0.1 in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from slm_fusion.app import create_app
from slm_fusion.config import FusionConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    app: Any

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def serve(app: Any, startup_timeout: float = 120.0) -> Iterator[Served]:
    """Serve `app` on a free port until the block ends (then a graceful uvicorn shutdown)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start in time")
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{port}", server, thread, app)
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextlib.contextmanager
def serve_gateway(config: dict) -> Iterator[Served]:
    with serve(create_app(FusionConfig.model_validate(config))) as served:
        yield served


def gateway_of(served: Served):
    return served.app.state.gateway


TINY = {"name": "tiny", "backend": "transformers", "model": "tiny-random-llama", "max_batch_size": 8,
        "batch_wait_ms": 50, "max_output_tokens": 64, "torch_threads": 1}


def upstream_model(name: str, base: str, upstream_model: str = "mock", **kw: Any) -> dict:
    return {"name": name, "backend": "openai", "model": upstream_model, "base_url": base + "/v1", **kw}
