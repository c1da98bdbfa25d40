"""A minimal, fast OpenAI-compatible upstream (raw ASGI, no framework) for tests and the gateway benchmark.

It answers every chat/completions request with a fixed text, so any latency measured in front of it is the
proxy's own. The requested `model` picks a behaviour, which lets tests exercise the `openai` backend's failure paths:
  * `fail-500`  → HTTP 500 with an OpenAI error body;
  * `slow`      → waits `mock_delay_s` seconds (request field, default 5) before answering;
  * `reset`     → (streaming) sends two chunks, then drops the connection without finishing the response;
  * anything else → the fixed answer (`n` choices, usage, SSE streaming with `[DONE]`).
Run standalone: `python -m slm_fusion.backends.mock_upstream --port 9000`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

ANSWER = "Hello from the mock upstream. The answer is 5."
WORDS = [w + " " for w in ANSWER.split(" ")]
WORDS[-1] = WORDS[-1].rstrip()


class MockUpstream:
    def __init__(self) -> None:
        self.requests = 0  # seen by tests to check that the gateway really forwarded

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if scope["method"] == "GET" and path.endswith("/models"):
            await _send_json(send, 200, {"object": "list", "data": [{"id": "mock", "object": "model", "created": 0,
                                                                      "owned_by": "mock"}]})
            return
        if scope["method"] != "POST" or not path.endswith(("/chat/completions", "/completions")):
            await _send_json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.requests += 1
        req = orjson.loads(body)
        model = req.get("model", "mock")
        chat = path.endswith("/chat/completions")
        if model == "fail-500":
            await _send_json(send, 500, {"error": {"message": "mock upstream exploded", "type": "server_error"}})
            return
        if model == "slow":
            await asyncio.sleep(float(req.get("mock_delay_s", 5.0)))
        n = int(req.get("n") or 1)
        if req.get("stream"):
            await self._stream(send, req, chat, n, reset=model == "reset")
            return
        usage = {"prompt_tokens": 7, "completion_tokens": len(WORDS) * n, "total_tokens": 7 + len(WORDS) * n}
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop",
                        "logprobs": None} for i in range(n)]
            out = {"id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()), "model": model,
                   "choices": choices, "usage": usage}
        else:
            choices = [{"index": i, "text": ANSWER, "finish_reason": "stop", "logprobs": None} for i in range(n)]
            out = {"id": "cmpl-mock", "object": "text_completion", "created": int(time.time()), "model": model,
                   "choices": choices, "usage": usage}
        await _send_json(send, 200, out)

    async def _stream(self, send: Any, req: dict, chat: bool, n: int, reset: bool) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        for k, word in enumerate(WORDS):
            if reset and k == 2:
                raise ConnectionResetError("mock upstream drops the connection mid-stream")
            last = k == len(WORDS) - 1
            choices = [
                {"index": i, "delta": {"content": word}, "finish_reason": "stop" if last else None} if chat
                else {"index": i, "text": word, "finish_reason": "stop" if last else None}
                for i in range(n)
            ]
            chunk = {"id": "mock", "object": obj, "created": created, "model": req.get("model"), "choices": choices}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                        "more_body": True})
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 7, "completion_tokens": len(WORDS) * n, "total_tokens": 7 + len(WORDS) * n}
            chunk = {"id": "mock", "object": obj, "created": created, "model": req.get("model"), "choices": [],
                     "usage": usage}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _send_json(send: Any, status: int, data: Any) -> None:
    body = orjson.dumps(data)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    uvicorn.run(MockUpstream(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
