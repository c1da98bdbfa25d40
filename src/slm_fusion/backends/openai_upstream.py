"""`openai` backend: an upstream OpenAI-compatible server behind one pooled `httpx.AsyncClient`.

Streaming is passed through as it arrives (one upstream SSE line at a time, never buffered whole). Upstream
failures become gateway errors: refused/reset connections and 5xx → 502, timeouts → 504, a reset in the middle of a
stream → `UpstreamError` raised from the iterator (the app turns it into an error frame and `[DONE]`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from slm_fusion.backends.base import Generation, GenerationRequest, TokenChunk
from slm_fusion.config import OpenAIModel
from slm_fusion.errors import FusionError, GatewayTimeout, InvalidRequest, QueueFull, UpstreamError


class OpenAIBackend:
    def __init__(self, config: OpenAIModel) -> None:
        self.config = config
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        headers = {"Content-Type": "application/json"}
        if key := self.config.resolved_api_key():
            headers["Authorization"] = f"Bearer {key}"
        read = self.config.timeout_s  # None: the gateway's own per-request deadline is the only limit
        limits = httpx.Limits(
            max_connections=self.config.max_connections,
            max_keepalive_connections=self.config.max_keepalive_connections,
            keepalive_expiry=self.config.keepalive_expiry_s,
        )
        self._client = httpx.AsyncClient(
            base_url=self.config.base_url.rstrip("/") + "/",
            headers=headers,
            limits=limits,
            transport=_transport(self.config.transport, limits),
            timeout=httpx.Timeout(read, connect=self.config.connect_timeout_s, pool=read),
            trust_env=False,  # a local upstream must not be sent through an environment proxy
        )

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("OpenAIBackend.start() was not awaited")
        return self._client

    # ------------------------------------------------------------------------------------------ requests

    def _body(self, req: GenerationRequest, stream: bool) -> tuple[str, bytes]:
        body: dict[str, Any] = dict(req.extra)
        body.update(model=self.config.model, max_tokens=req.max_tokens, temperature=req.temperature, n=req.n)
        if req.top_p != 1.0:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if req.messages is not None:
            body["messages"] = req.messages
            return "chat/completions", orjson.dumps(body)
        body["prompt"] = req.prompt
        return "completions", orjson.dumps(body)

    async def generate(self, req: GenerationRequest) -> list[Generation]:
        path, body = self._body(req, stream=False)
        try:
            resp = await self._send(self.client.build_request("POST", path, content=body), stream=False)
        except httpx.HTTPError as e:
            raise _map_transport_error(e, self.config.base_url) from None
        if resp.status_code != 200:
            raise _map_status(resp.status_code, resp.content)
        try:
            data = orjson.loads(resp.content)
            choices = data["choices"]
            usage = data.get("usage") or {}
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UpstreamError("upstream returned a response that is not an OpenAI completion") from None
        chat = req.messages is not None
        texts = [((c.get("message") or {}).get("content") if chat else c.get("text")) or "" for c in choices]
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        total = usage.get("completion_tokens")
        # Upstream usage is one total for all choices; split it so the gateway's per-choice sum stays exact.
        counts = _split(int(total), len(texts)) if total is not None else [self.count_tokens(t) for t in texts]
        return [
            Generation(text=t, finish_reason=c.get("finish_reason") or "stop", prompt_tokens=prompt_tokens,
                       completion_tokens=k)
            for t, c, k in zip(texts, choices, counts, strict=True)
        ]

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenChunk]:
        path, body = self._body(req, stream=True)
        chat = req.messages is not None
        done = False
        try:
            resp = await self._send(self.client.build_request("POST", path, content=body), stream=True)
            async with contextlib.aclosing(resp):  # type: ignore[type-var]
                if resp.status_code != 200:
                    raise _map_status(resp.status_code, await resp.aread())
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments and `event:` lines
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    try:
                        obj = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        raise UpstreamError("upstream sent a stream line that is not JSON") from None
                    if "error" in obj:
                        err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
                        raise UpstreamError(f"upstream error: {err.get('message', err)}")
                    for c in obj.get("choices") or ():
                        text = ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""
                        if text or c.get("finish_reason"):
                            yield TokenChunk(index=c.get("index", 0), text=text, finish_reason=c.get("finish_reason"))
                    if usage := obj.get("usage"):
                        yield TokenChunk(
                            index=0, text="",
                            usage=(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)),
                        )
        except httpx.HTTPError as e:
            raise _map_transport_error(e, self.config.base_url) from None
        if not done:
            raise UpstreamError("upstream closed the stream before [DONE]")

    async def _send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        """Send, retrying once when a pooled keep-alive connection turns out to be closed by the upstream.

        That race (the upstream drops an idle connection as we reuse it) fails before the upstream has read the
        request, so one retry on a fresh connection is safe.
        """
        try:
            return await self.client.send(request, stream=stream)
        except httpx.TransportError as e:
            cause = type(e.__cause__).__name__ if e.__cause__ is not None else ""
            if not isinstance(e, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError) and \
                    cause != "ServerDisconnectedError":
                raise
            return await self.client.send(request, stream=stream)

    def count_tokens(self, text: str) -> int:
        # No tokenizer for a remote model: OpenAI's rule of thumb (about 4 characters per token).
        return math.ceil(len(text) / 4)

    def format_chat(self, messages: list[dict[str, Any]]) -> str:
        raise NotImplementedError("an OpenAI-compatible upstream does not expose its chat template")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _transport(kind: str, limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    """httpx's own pool (httpcore) costs ~4x the CPU per request of aiohttp's under concurrency, and the
    gateway's overhead is mostly this call: use aiohttp's connection pool behind the same httpx client API."""
    if kind == "aiohttp":
        try:
            from httpx_aiohttp import AiohttpTransport
        except ImportError:  # optional speed-up; httpx's default transport works the same
            return None
        return AiohttpTransport(limits=limits, trust_env=False)
    return None


def _split(total: int, parts: int) -> list[int]:
    if parts == 0:
        return []
    base, rem = divmod(total, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


def _map_transport_error(e: httpx.HTTPError, url: str) -> FusionError:
    timed_out = isinstance(e, httpx.TimeoutException)
    if e.__cause__ is not None and type(e.__cause__).__module__.startswith("aiohttp"):
        # httpx-aiohttp maps every aiohttp connection error (refused, disconnected) to ConnectTimeout:
        # judge by the original exception instead.
        timed_out = isinstance(e.__cause__, TimeoutError)
        e = e.__cause__  # type: ignore[assignment]
    if timed_out:
        return GatewayTimeout(f"upstream {url} timed out ({type(e).__name__})")
    return UpstreamError(f"upstream {url} failed: {type(e).__name__}: {e}")


def _map_status(status: int, content: bytes) -> FusionError:
    try:
        message = orjson.loads(content)["error"]["message"]
    except Exception:  # noqa: BLE001 — any non-OpenAI error body is reported by its status alone
        message = content[:200].decode("utf-8", "replace")
    if status in (400, 413, 422):
        return InvalidRequest(f"upstream rejected the request: {message}")
    if status == 429:
        err = QueueFull("upstream")
        err.message = f"upstream is rate limiting: {message}"
        return err
    if status in (408, 504):
        return GatewayTimeout(f"upstream timed out (HTTP {status}): {message}")
    return UpstreamError(f"upstream returned HTTP {status}: {message}")
