"""`openai` backend: an upstream OpenAI-compatible server behind one pooled `httpx.AsyncClient`.

The client's request is forwarded as it was sent (`GenerationRequest.sent`: no defaults added, unknown fields,
tools and tool-call history kept); `tool_calls` and `logprobs` come back unchanged. When the gateway traces, the
request carries the W3C `traceparent` of its backend span (headers only: the body is the client's). Streaming is passed through as
it arrives (one upstream SSE line at a time, never buffered whole). Upstream failures become gateway errors:
refused/reset connections and 5xx → 502, timeouts → 504, 429 → 429 with the upstream's Retry-After, a reset or a
wrong-shape chunk in the middle of a stream → `UpstreamError` raised from the iterator (the app turns it into an
error frame and `[DONE]`). Client-facing messages never carry the upstream's URL.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from slm_fusion import protocol as P
from slm_fusion import tracing
from slm_fusion.backends.base import Generation, GenerationRequest, TokenChunk
from slm_fusion.config import OpenAIModel
from slm_fusion.errors import FusionError, GatewayTimeout, InvalidRequest, UpstreamError, UpstreamRateLimited

log = logging.getLogger("slm_fusion.upstream")


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
        body = P.upstream_body(self.config.model, req, stream)
        if "max_tokens" not in body and "max_completion_tokens" not in body and self._default_cap is not None:
            body["max_tokens"] = self._default_cap  # configured on purpose (`default_max_tokens`), never implied
        try:
            data = orjson.dumps(body)
        except TypeError as e:  # orjson: lone surrogates, integers beyond 64 bits
            raise InvalidRequest(f"the request cannot be forwarded as JSON: {e} (send valid Unicode text and "
                                 "integers within 64 bits)") from None
        return ("chat/completions" if "messages" in body else "completions"), data

    @property
    def _default_cap(self) -> int | None:
        return self.config.default_max_tokens if "default_max_tokens" in self.config.model_fields_set else None

    async def post(self, path: str, body: bytes) -> bytes:
        """One non-streaming POST (retried only when it provably never left) and the upstream's 200 answer; any
        failure as a gateway error."""
        try:
            resp = await self._send(self.client.build_request("POST", path, content=body,
                                                              headers=tracing.upstream_headers()), stream=False)
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if resp.status_code != 200:
            raise self._status_error(resp.status_code, resp.content, resp.headers)
        return resp.content

    async def generate(self, req: GenerationRequest) -> list[Generation]:
        path, body = self._body(req, stream=False)
        content = await self.post(path, body)
        try:
            choices, usage = P.completion_choices(orjson.loads(content), chat=req.messages is not None)
        except (orjson.JSONDecodeError, P.UpstreamShapeError) as e:
            message = str(e) if isinstance(e, P.UpstreamShapeError) else "upstream returned a body that is not JSON"
            raise UpstreamError(message) from None
        prompt_tokens = _int(usage.get("prompt_tokens"))
        total = usage.get("completion_tokens")
        # Upstream usage is one total for all choices; split it so the gateway's per-choice sum stays exact.
        counts = (_split(_int(total), len(choices)) if total is not None
                  else [self.count_tokens(c["text"]) for c in choices])
        return [
            Generation(text=c["text"], finish_reason=c["finish_reason"], prompt_tokens=prompt_tokens,
                       completion_tokens=k, tool_calls=c["tool_calls"], logprobs=c["logprobs"])
            for c, k in zip(choices, counts, strict=True)
        ]

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenChunk]:
        path, body = self._body(req, stream=True)
        chat = req.messages is not None
        done = False
        try:
            resp = await self._send(self.client.build_request("POST", path, content=body, headers=tracing.upstream_headers()), stream=True)
            async with contextlib.aclosing(resp):  # type: ignore[type-var]
                if resp.status_code != 200:
                    raise self._status_error(resp.status_code, await resp.aread(), resp.headers)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments and `event:` lines
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    try:
                        choices, usage = P.chunk_choices(orjson.loads(payload), chat)
                    except orjson.JSONDecodeError:
                        raise UpstreamError("upstream sent a stream line that is not JSON") from None
                    except P.UpstreamShapeError as e:
                        raise UpstreamError(str(e)) from None
                    for index, text, finish, tool_calls, logprobs in choices:
                        if text or finish or tool_calls or logprobs:
                            yield TokenChunk(index, text, finish, None, tool_calls, logprobs)
                    if usage:
                        yield TokenChunk(index=0, text="", usage=(_int(usage.get("prompt_tokens")),
                                                                  _int(usage.get("completion_tokens"))))
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if not done:
            raise UpstreamError(f"the upstream of model '{self.config.name}' closed the stream before [DONE]")

    async def _send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        """Send, retrying once only when the request provably never reached the upstream (the connection could
        not be opened). A failure after the request went out (a reset, a read error, a keep-alive connection
        the upstream closed as we used it) is not retried: the upstream may already be doing the work, and a
        POST sent twice is work done twice."""
        try:
            return await self.client.send(request, stream=stream)
        except httpx.TransportError as e:
            if not _not_sent(e):
                raise
            return await self.client.send(request, stream=stream)

    # -------------------------------------------------------------------------------------------- errors

    def _transport_error(self, e: httpx.HTTPError) -> FusionError:
        """Client-facing errors name the model, never the upstream's URL (logged here instead)."""
        timed_out = isinstance(e, httpx.TimeoutException)
        cause = e.__cause__
        if cause is not None and type(cause).__module__.startswith("aiohttp"):
            # httpx-aiohttp maps every aiohttp connection error (refused, disconnected) to ConnectTimeout:
            # judge by the original exception instead.
            timed_out = isinstance(cause, TimeoutError)
            e = cause  # type: ignore[assignment]
        log.warning("upstream of model '%s' at %s failed: %s: %s", self.config.name, self.config.base_url,
                    type(e).__name__, e)
        if timed_out:
            return GatewayTimeout(f"the upstream of model '{self.config.name}' timed out ({type(e).__name__})")
        return UpstreamError(f"the upstream of model '{self.config.name}' failed: {type(e).__name__}")

    def _status_error(self, status: int, content: bytes, headers: httpx.Headers) -> FusionError:
        message = _scrub(P.upstream_error_message(content), self.config.base_url)
        if status in (400, 413, 422):
            return InvalidRequest(f"upstream rejected the request: {message}")
        if status == 429:
            return UpstreamRateLimited(self.config.name, message, headers.get("retry-after"))
        if status in (408, 504):
            return GatewayTimeout(f"upstream timed out (HTTP {status}): {message}")
        return UpstreamError(f"upstream returned HTTP {status}: {message}")

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


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _not_sent(e: httpx.TransportError) -> bool:
    """True when the connection could not be opened, so the upstream never saw a byte of the request."""
    cause = e.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        import aiohttp

        return isinstance(cause, aiohttp.ClientConnectorError)
    return isinstance(e, httpx.ConnectError)


def _scrub(message: str, base_url: str) -> str:
    """Upstream error text may quote the upstream's own address: never pass that to clients."""
    origin = httpx.URL(base_url)
    for needle in (base_url.rstrip("/"), f"{origin.scheme}://{origin.host}", f"{origin.host}:{origin.port}"):
        if needle and needle in message:
            message = message.replace(needle, "<upstream>")
    return message
