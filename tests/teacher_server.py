"""A scripted OpenAI-compatible teacher server for tests and benchmarks (FastAPI + uvicorn on 127.0.0.1).

Replies are scripted by the question (the last user message):
  * `script[question]` is a list of completion texts; the j-th choice served for that question gets
    script[question][j % len]. Unknown questions get "The answer is 0.".
  * markers in the question inject failures on the FIRST attempt for that question, then behave:
      [[429]] 429 with Retry-After (`retry_after` s)      [[500]] HTTP 500
      [[timeout]] sleeps `slow_s` (past the client timeout)  [[malformed]] 200 with a body that is not JSON
      [[fewer]] always returns 1 choice whatever n is       [[empty]] a choice whose content is null
Optional auth (`api_key`): a wrong bearer token gets 401. A model not in `models` gets 404.

Counting: `GET /stats` -> {"requests", "served_choices": {question: n}, "statuses": {code: n}}. A choice is counted
only when its 200 response is actually returned. `POST /control {"hold_after": N}` makes every request after the
N-th served one wait; `POST /control {"release": true}` answers the held ones 503 (uncounted) and ends the hold.
Run standalone: `python tests/teacher_server.py --port 8011 --latency 0.05`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse


@dataclass
class ServerState:
    script: dict[str, list[str]] = field(default_factory=dict)
    latency_s: float = 0.0
    retry_after: float = 0.2
    slow_s: float = 5.0
    api_key: str | None = None
    models: tuple[str, ...] = ("teacher-1",)
    requests: int = 0
    served_total: int = 0
    served: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)
    attempt_times: dict[str, list[float]] = field(default_factory=dict)
    hold_after: int | None = None
    release: asyncio.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def hold(self, after: int) -> None:
        """From another thread: park every request that arrives after `after` choices were served."""
        self.release = asyncio.Event()
        self.hold_after = after

    def release_held(self) -> None:
        """From another thread: answer the parked requests 503 (uncounted) and stop holding."""
        self.hold_after = None
        if self.release is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.release.set)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "test", "code": status}}, status_code=status,
                        headers=headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI()

    @app.get("/stats")
    async def stats() -> dict:
        return {"requests": state.requests, "served_total": state.served_total, "served_choices": dict(state.served),
                "statuses": {str(k): v for k, v in state.statuses.items()}}

    @app.post("/control")
    async def control(body: dict) -> dict:
        if "hold_after" in body:
            state.hold_after = body["hold_after"]
            state.release = asyncio.Event()
        if body.get("release") and state.release is not None:
            state.hold_after = None
            state.release.set()
        if "latency_s" in body:
            state.latency_s = float(body["latency_s"])
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        state.requests += 1
        state.loop = asyncio.get_running_loop()
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            state.statuses[401] += 1
            return _error(401, "Incorrect API key provided")
        body = await request.json()
        if body.get("model") not in state.models:
            state.statuses[404] += 1
            return _error(404, f"The model `{body.get('model')}` does not exist")
        question = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        n = int(body.get("n") or 1)
        state.attempts[question] += 1
        state.attempt_times.setdefault(question, []).append(time.monotonic())
        first = state.attempts[question] == 1
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
        if state.hold_after is not None and state.served_total >= state.hold_after:
            await state.release.wait()
            state.statuses[503] += 1
            return _error(503, "held, then released")
        if first and "[[429]]" in question:
            state.statuses[429] += 1
            return _error(429, "rate limited", headers={"Retry-After": str(state.retry_after)})
        if first and "[[500]]" in question:
            state.statuses[500] += 1
            return _error(500, "internal error")
        if first and "[[timeout]]" in question:
            await asyncio.sleep(state.slow_s)
        if first and "[[malformed]]" in question:
            state.statuses["malformed"] += 1
            return PlainTextResponse('{"id": "x", "choices": [', media_type="application/json")
        if "[[fewer]]" in question:
            n = 1
        texts = state.script.get(question, ["The answer is 0."])
        choices = []
        for j in range(n):
            text = texts[(state.served[question] + j) % len(texts)]
            content = None if (first and "[[empty]]" in question and j == 0) else text
            choices.append({"index": j, "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop"})
        if await request.is_disconnected():  # the client is gone: nothing was delivered, count nothing
            return _error(499, "client closed request")
        state.served[question] += n
        state.served_total += n
        state.statuses[200] += 1
        return {"id": f"chatcmpl-{state.requests}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 50, "completion_tokens": 20 * n, "total_tokens": 50 + 20 * n}}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """uvicorn serving `create_app(state)` in a background thread of the test process."""

    def __init__(self, state: ServerState, port: int | None = None):
        self.state = state
        self.port = port or free_port()
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("teacher test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--script", help="JSON file {question: [completion, ...]}")
    parser.add_argument("--model", default="teacher-1")
    args = parser.parse_args()
    script = json.loads(Path(args.script).read_text()) if args.script else {}
    state = ServerState(script=script, latency_s=args.latency, models=(args.model,))
    uvicorn.run(create_app(state), host="127.0.0.1", port=args.port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
