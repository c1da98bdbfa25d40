"""A minimal, fast OpenAI-compatible upstream (raw ASGI, no framework) for tests and the gateway benchmark.

It answers every chat/completions request with a fixed text, so any latency measured in front of it is the
proxy's own. The requested `model` picks a behaviour, which lets tests exercise the `openai` backend's failure paths:
  * `fail-500`  → HTTP 500 with an OpenAI error body;
  * `slow`      → waits `mock_delay_s` seconds (request field, default 5) before answering;
  * `reset`     → (streaming) sends two chunks, then drops the connection without finishing the response;
  * `cut`       → (non-streaming) starts a 200 response, sends half of it, then drops the connection;
  * `rate-429`  → HTTP 429 with `Retry-After: 7`;
  * `bad-shape` → HTTP 200 with JSON that is not an OpenAI completion (streaming: a chunk with `choices: "x"`);
  * `leak`      → HTTP 500 whose message quotes the upstream's own URL;
  * `tools`     → a `get_weather` function call (`tool_calls`; streamed as id/name then argument fragments);
  * anything else → the fixed answer (`n` choices, usage, SSE streaming with `[DONE]`).
`POST /v1/embeddings` answers 4-dimensional vectors made from each input's length (float lists, or base64 of
little-endian float32 with `encoding_format: base64`); `fail-500`, `leak` and `rate-429` fail there too.
`logprobs: true` in a request adds per-token logprobs to the answer. The last request bodies are kept in
`received` and their headers in `received_headers` (tests check what the gateway forwarded). `POST /v1/traces`
answers 200 and discards the body: an OTLP/HTTP sink for the tracing benchmark.
Run standalone: `python -m slm_fusion.backends.mock_upstream --port 9000`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import struct
import threading
import time
from typing import Any

import orjson

ANSWER = "Hello from the mock upstream. The answer is 5."
WORDS = [w + " " for w in ANSWER.split(" ")]
WORDS[-1] = WORDS[-1].rstrip()
TOOL_CALL = {"id": "call_mock1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}


def _logprobs(words: list[str]) -> dict:
    return {"content": [{"token": w, "logprob": -0.5, "bytes": list(w.encode()), "top_logprobs": []} for w in words]}


def _embeddings(req: dict) -> dict:
    inputs = req.get("input")
    inputs = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else inputs or []
    data = []
    for i, text in enumerate(inputs):
        vector = [len(text) / 10, 1.0 / (1 + i), -0.25, 0.5]
        if req.get("encoding_format") == "base64":
            embedding: Any = base64.b64encode(struct.pack("<4f", *vector)).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(len(t) if isinstance(t, list) else len(t.split()) for t in inputs)
    return {"object": "list", "data": data, "model": req.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class MockUpstream:
    def __init__(self) -> None:
        self.requests = 0  # seen by tests to check that the gateway really forwarded
        self.received: collections.deque[dict] = collections.deque(maxlen=32)  # the last request bodies
        self.received_headers: collections.deque[dict[str, str]] = collections.deque(maxlen=32)  # and headers
        self._arrived = threading.Condition()  # notified per request: tests wait for one to be in flight

    def wait_for_requests(self, count: int, timeout: float) -> bool:
        """Block (from another thread) until `count` requests have arrived in all; False on timeout."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.requests >= count, timeout)

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
        if scope["method"] == "POST" and path == "/v1/traces":
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["method"] != "POST" or not path.endswith(("/chat/completions", "/completions", "/embeddings")):
            await _send_json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        with self._arrived:
            self.requests += 1
            self._arrived.notify_all()
        req = orjson.loads(body)
        self.received.append(req)
        self.received_headers.append({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
        model = req.get("model", "mock")
        chat = path.endswith("/chat/completions")
        if model == "fail-500":
            await _send_json(send, 500, {"error": {"message": "mock upstream exploded", "type": "server_error"}})
            return
        if model == "leak":
            host = dict(scope["headers"]).get(b"host", b"").decode()
            await _send_json(send, 500, {"error": {"message": f"cannot reach http://{host}/v1/internal",
                                                   "type": "server_error"}})
            return
        if model == "rate-429":
            await _send_json(send, 429, {"error": {"message": "slow down", "type": "rate_limit_error"}},
                             [(b"retry-after", b"7")])
            return
        if path.endswith("/embeddings"):
            await _send_json(send, 200, _embeddings(req))
            return
        if model == "cut":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"400")]})
            await send({"type": "http.response.body", "body": b'{"id": "chatcmpl-mock", "choices": [', "more_body": True})
            raise ConnectionResetError("mock upstream drops the connection after reading the request")
        if model == "bad-shape" and not req.get("stream"):
            await _send_json(send, 200, {"id": "x", "choices": 5})
            return
        if model == "slow":
            await asyncio.sleep(float(req.get("mock_delay_s", 5.0)))
        n = int(req.get("n") or 1)
        if req.get("stream"):
            await self._stream(send, req, chat, n, model)
            return
        usage = {"prompt_tokens": 7, "completion_tokens": len(WORDS) * n, "total_tokens": 7 + len(WORDS) * n}
        logprobs = _logprobs(WORDS) if req.get("logprobs") else None
        if chat and model == "tools":
            message = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
            choices = [{"index": i, "message": message, "finish_reason": "tool_calls", "logprobs": None}
                       for i in range(n)]
            out = {"id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()), "model": model,
                   "choices": choices, "usage": usage}
        elif chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop",
                        "logprobs": logprobs} for i in range(n)]
            out = {"id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()), "model": model,
                   "choices": choices, "usage": usage}
        else:
            choices = [{"index": i, "text": ANSWER, "finish_reason": "stop", "logprobs": logprobs} for i in range(n)]
            out = {"id": "cmpl-mock", "object": "text_completion", "created": int(time.time()), "model": model,
                   "choices": choices, "usage": usage}
        await _send_json(send, 200, out)

    async def _stream(self, send: Any, req: dict, chat: bool, n: int, model: str) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat and model == "tools":
            await self._stream_tool_call(send, req, created)
            return
        logprobs = bool(req.get("logprobs"))
        for k, word in enumerate(WORDS):
            if model == "reset" and k == 2:
                raise ConnectionResetError("mock upstream drops the connection mid-stream")
            if model == "bad-shape" and k == 2:
                chunk = {"id": "mock", "object": obj, "created": created, "choices": "x"}
                await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                            "more_body": True})
                continue
            last = k == len(WORDS) - 1
            choices = [
                {"index": i, "delta": {"content": word}, "finish_reason": "stop" if last else None} if chat
                else {"index": i, "text": word, "finish_reason": "stop" if last else None}
                for i in range(n)
            ]
            if logprobs:
                for c in choices:
                    c["logprobs"] = _logprobs([word])
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

    async def _stream_tool_call(self, send: Any, req: dict, created: int) -> None:
        """OpenAI's shape: the first fragment carries index, id, type and name; later ones argument pieces."""
        fn = TOOL_CALL["function"]
        args = fn["arguments"]
        deltas = [{"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": TOOL_CALL["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}]}]
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 8]}}]}
                   for i in range(0, len(args), 8)]
        for k, delta in enumerate(deltas + [{}]):
            chunk = {"id": "mock", "object": "chat.completion.chunk", "created": created, "model": req.get("model"),
                     "choices": [{"index": 0, "delta": delta, "finish_reason": "tool_calls" if k == len(deltas) else None}]}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _send_json(send: Any, status: int, data: Any, headers: list | None = None) -> None:
    body = orjson.dumps(data)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or ())]})
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
