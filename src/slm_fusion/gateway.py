"""The gateway's core: model name -> deployment (routers plug in here), the one place a generation runs (the
reasoning layer wraps it), fallbacks along `routing.fallbacks`, and the client's request turned into the engine's
`GenerationRequest`. No HTTP here: `serving` speaks to the client, `app` declares the routes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from slm_fusion import protocol as P
from slm_fusion import routing, tools, tracing
from slm_fusion.backends.base import (
    Backend,
    Generation,
    GenerationRequest,
    ReasoningOptions,
    TokenChunk,
    make_backend,
)
from slm_fusion.config import FusionConfig
from slm_fusion.context import ContextStore
from slm_fusion.context.store import open_store
from slm_fusion.deployments import ModelHandle, attach_health, make_embedder
from slm_fusion.errors import GatewayTimeout, InvalidRequest, ModelNotFound
from slm_fusion.keys import KeyAccounting
from slm_fusion.metrics import GatewayMetrics
from slm_fusion.reasoning import make_reasoning_layer

log = logging.getLogger("slm_fusion")

class Gateway:
    """Everything a request needs, built from the config (no module-level state)."""

    def __init__(
        self,
        config: FusionConfig,
        *,
        backends: dict[str, list[Backend]] | None = None,
        routers: dict[str, routing.Router] | None = None,
        reasoning: Any | None = None,
        tracer_provider: Any | None = None,
    ) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.api_keys = [k.encode() for k in config.server.resolved_api_keys()]
        # Keys with budgets and the usage ledger (slm_fusion.keys), in addition to the static keys above.
        self.keys = KeyAccounting.from_url(config.keys.url, config.keys.flush_interval_s) if config.keys else None
        # OpenTelemetry (slm_fusion.tracing): None when off, which every call site tests before any span work.
        self._owns_provider = tracer_provider is None
        self.tracer_provider = tracer_provider if tracer_provider is not None else tracing.make_provider(config.tracing)
        self.tracer = self.tracer_provider.get_tracer("slm_fusion") if self.tracer_provider is not None else None
        backends = backends or {}
        self.handles: dict[str, ModelHandle] = {}
        shared: dict[Any, Any] = {}  # engines that several adapter models run on (backends/adapters.py)
        for m in config.models:
            replicas = backends.get(m.name) or [make_backend(m, shared) for _ in range(m.replicas)]
            self.handles[m.name] = ModelHandle(m, replicas, self.metrics)
        self.routers = routers if routers is not None else _default_routers(config)
        self.routing = attach_health(config, self.handles)  # fallbacks and replica cooldowns
        self.reasoning = reasoning if reasoning is not None else make_reasoning_layer(config)
        self.embedder = make_embedder(config.embeddings) if config.embeddings else None
        self.context: ContextStore | None = None  # files and vector stores (slm_fusion.context), opened in start()
        self.created = int(time.time())
        # The last route decisions (virtual models, fallbacks), newest last: the web console's Routing page.
        self.recent_routes: collections.deque[dict[str, Any]] = collections.deque(maxlen=config.ui.recent_routes)
        self.dropped_logged: set[tuple[str, str]] = set()  # (model, field) already logged as ignored

    async def start(self) -> None:
        if self.keys is not None:
            await self.keys.start()
        if self.config.context is not None and self.context is None:
            ctx = self.config.context
            self.context = open_store(ctx.url or ctx.path, self.embedder.vectors, self.embedder.offsets,
                                      ctx.max_file_bytes, batch_lease_s=ctx.batch_lease_s,
                                      vector_index=ctx.vector_index)
            await asyncio.to_thread(self.context.resume_batches)  # the batches a killed worker left unfinished
        for handle in self.handles.values():
            for b in handle.backends:
                try:
                    await b.start()
                except Exception as e:
                    handle.state = f"error: {e}"
                    raise RuntimeError(f"model '{handle.name}' ({handle.config.backend}) failed to start: {e}") from e
            handle.state = "ready"

    async def aclose(self) -> None:
        if self.context is not None:
            await asyncio.to_thread(self.context.close)  # waits for a batch runner to finish its file
            self.context = None
        for handle in self.handles.values():
            for b in handle.backends:
                with contextlib.suppress(Exception):
                    await b.aclose()
        if self.embedder is not None:
            await self.embedder.aclose()
        if self.keys is not None:
            await self.keys.aclose()  # the last ledger rows: a clean shutdown loses none
        if self.tracer_provider is not None and self._owns_provider:
            self.tracer_provider.shutdown()  # exports the spans still queued

    def model_names(self) -> list[str]:
        return list(self.handles) + [n for n in self.routers if n not in self.handles]

    # ------------------------------------------------------------------ the seam for routers
    async def resolve_target(
        self, request: P.ChatCompletionRequest | P.CompletionRequest, headers: Any = None
    ) -> tuple[ModelHandle, routing.RouteDecision | None]:
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
        with tracing.span(self.tracer, "slm_fusion.routing", {"gen_ai.request.model": name}) as traced:
            # The headers travel inside the request (rules may match on `x-...` values).
            decision = await router.route(routing.routing_request(request, headers))
            if traced is not None:
                traced.set_attributes({
                    "slm_fusion.router": decision.router, "slm_fusion.route.model": decision.model,
                    "slm_fusion.route.score": decision.score, "slm_fusion.route.reason": decision.reason,
                    "slm_fusion.route.plan": isinstance(decision, routing.ExecutionPlan)})
        handle = self.handles.get(decision.model)
        if handle is None:
            raise ModelNotFound(f"{decision.model} (chosen by the router of '{name}')", list(self.handles))
        return handle, decision

    # ------------------------------------------------------------------ the seam for the reasoning layer
    async def execute(self, handle: ModelHandle, backend: Backend, gen: GenerationRequest) -> list[Generation]:
        """Run one generation: the only place a backend is asked for complete text (one `slm_fusion.backend` span
        when tracing)."""
        if self.tracer is None:
            return await self._execute(handle, backend, gen)
        with tracing.span(self.tracer, "slm_fusion.backend", _backend_attributes(handle, backend),
                          tracing.SpanKind.CLIENT) as traced:
            gens = await self._execute(handle, backend, gen)
            traced.set_attributes({"gen_ai.usage.input_tokens": gens[0].prompt_tokens if gens else 0,
                                   "gen_ai.usage.output_tokens": sum(g.completion_tokens for g in gens)})
            return gens

    async def _execute(self, handle: ModelHandle, backend: Backend, gen: GenerationRequest) -> list[Generation]:
        if gen.tools is not None:  # function calling on a local model: replies that are calls become tool_calls
            return tools.as_tool_calls(await backend.generate(gen), gen.tools)
        if self.reasoning.applies(gen.reasoning, handle.config):
            with tracing.span(self.tracer, "slm_fusion.reasoning"):  # the layer annotates it (mode, budget, forced)
                return await self.reasoning.generate(backend, gen, handle.config)
        return await backend.generate(gen)

    async def execute_stream(
        self, handle: ModelHandle, backend: Backend, gen: GenerationRequest
    ) -> AsyncIterator[TokenChunk]:
        """Streaming counterpart of `execute`; reasoning strategies and local tool calls produce whole answers, sent
        as one chunk each (a call as one `tool_calls` delta)."""
        if gen.tools is not None or self.reasoning.applies(gen.reasoning, handle.config):
            async for chunk in _chunks_of(await self.execute(handle, backend, gen)):
                yield chunk
            return
        if self.tracer is None:
            async for chunk in backend.stream(gen):
                yield chunk
            return
        # The span is current only while the stream opens (the upstream request, with its traceparent, goes out
        # in the first step), never across a yield: the rest of the stream runs in the response's task.
        traced = self.tracer.start_span("slm_fusion.backend", kind=tracing.SpanKind.CLIENT,
                                        attributes=_backend_attributes(handle, backend))
        chunks = backend.stream(gen)
        try:
            with tracing.trace.use_span(traced, record_exception=False, set_status_on_exception=False):
                chunk = await anext(chunks, None)
            while chunk is not None:
                yield chunk
                chunk = await anext(chunks, None)
        except Exception as e:
            traced.record_exception(e)
            traced.set_status(tracing.trace.StatusCode.ERROR, str(e))
            raise
        finally:
            await chunks.aclose()
            traced.end()

    # ------------------------------------------------------------------ routing: fallbacks, cascades, fusion
    def fallback_chain(self, name: str) -> list[str]:
        # Each extra replica is one more try of the same model (a failed replica is skipped while it cools down).
        retries = [name] * (len(self.handles[name].backends) - 1)
        chain = self.routing.chain(name)
        return [chain[0], *retries, *chain[1:]]

    def _available(self, name: str) -> bool:
        health = self.handles[name].health
        return health is None or health.available()

    async def generate_on(
        self, handle: ModelHandle, body: Any, gen: GenerationRequest | None = None, *,
        sent: dict[str, Any] | None = None, sources: list[Any] | None = None, **overrides: Any,
    ) -> list[Generation]:
        """One generation on `handle` within its own timeout; a timeout counts as a failure of the replica used.
        `sent`: the client's fields as sent (for an upstream), `sources`: the retrieved ones, when `gen` is built
        here."""
        gen = gen or self.generation_request(handle, body, sent, sources)
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
                    return await self.execute(handle, backend, gen)
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

        if isinstance(decision, routing.ExecutionPlan):
            async def call(model: str, **overrides: Any) -> list[Generation]:
                async def attempt(m: str) -> list[Generation]:
                    return await self.generate_on(self.handles[m], body, sent=gen.sent, sources=gen.sources,
                                                  **overrides)

                return (await with_fallbacks(self.fallback_chain(model), attempt, self._available))[1]

            gens = await decision.execute(call)
            return self.handles[decision.model], gens, decision

        async def attempt(m: str) -> list[Generation]:
            h = self.handles[m]
            return await self.generate_on(h, body, gen if h is handle else None, sent=gen.sent, sources=gen.sources)

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
        if isinstance(decision, routing.ExecutionPlan):  # plans produce whole answers: sent as one chunk per choice
            h, gens, decision = await self.generate_routed(handle, decision, body, gen)
            chunks = _chunks_of(gens)
            first = await anext(chunks, None)
            return h, contextlib.AsyncExitStack(), chunks, first, loop.time() + 1e9, decision

        async def attempt(m: str) -> tuple:
            h = self.handles[m]
            g = gen if h is handle else self.generation_request(h, body, gen.sent, gen.sources)
            timeout = h.timeout(self.config.server.request_timeout_s)
            deadline = loop.time() + timeout
            stack = contextlib.AsyncExitStack()
            chunks: AsyncIterator[TokenChunk] | None = None
            used: list[Backend] = []
            try:
                async with asyncio.timeout_at(deadline):
                    backend = await stack.enter_async_context(h.slot(self.config.server.retry_after_s))
                    used.append(backend)
                    chunks = self.execute_stream(h, backend, g)
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
        sent: dict[str, Any] | None = None, sources: list[Any] | None = None,
    ) -> GenerationRequest:
        """`body` → the engine's request. `sent`: the client's fields exactly as sent (`P.sent_fields`), carried
        for OpenAI-compatible upstreams (and for fallbacks to them); `sources`: what retrieval packed into the
        messages (`GenerationRequest.sources`)."""
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
            "reasoning": ReasoningOptions(reasoning_budget=body.reasoning_budget, pal=body.pal, vote=body.vote,
                                          temperature_set=body.temperature is not None),
            "sources": list(sources or []),
        }
        if isinstance(body, P.ChatCompletionRequest):
            plan = tools.plan_of(extra.get("tools"), extra.get("tool_choice")) if not upstream else None
            if plan is not None:  # a local model calls functions through a plain chat (slm_fusion.tools)
                if (forced := tools.response_format(plan)) is not None:
                    if extra.get("response_format") is not None:
                        raise InvalidRequest("a forced tool call (tool_choice required or a named function) is "
                                             "already constrained: drop response_format", param="response_format")
                    extra["response_format"] = forced
                return GenerationRequest(messages=tools.messages_for(body.messages, plan), tools=plan, **common)
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
        fmt = extra.get("response_format")
        enforced = getattr(handle.backends[0], "supports_response_format", False)  # transformers: backends/structured.py
        if extra.get("tools") and extra.get("tool_choice") != "none" and not enforced:
            raise InvalidRequest(f"{name} does not support function calling (`tools`); drop `tools` or pick a "
                                 "model served by an OpenAI-compatible upstream", param="tools")
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
        asked = extra.get("logprobs")
        if asked is not None and isinstance(body, P.ChatCompletionRequest) and not isinstance(asked, bool):
            raise InvalidRequest("logprobs (chat) must be true or false; say how many alternatives with top_logprobs",
                                 param="logprobs")
        if asked is not None and not isinstance(body, P.ChatCompletionRequest):
            if not getattr(handle.backends[0], "supports_completion_logprobs", False):
                raise InvalidRequest(f"{name} returns logprobs on chat completions only (`logprobs: true`, "
                                     "`top_logprobs`); use /v1/chat/completions", param="logprobs")
            if not isinstance(asked, int) or isinstance(asked, bool) or not 0 <= asked <= 5:
                raise InvalidRequest("logprobs (text completions) must be an integer from 0 to 5", param="logprobs")
        top = extra.get("top_logprobs")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20):
            raise InvalidRequest("top_logprobs must be an integer from 0 to 20", param="top_logprobs")
        read = LOCAL_FIELDS | ({"response_format", "tools"} if enforced else set()) | (
            {"logprobs", "top_logprobs"} if getattr(handle.backends[0], "supports_logprobs", False) else set())
        dropped = [k for k in extra if k not in read and (handle.name, k) not in self.dropped_logged]
        for key in dropped:
            self.dropped_logged.add((handle.name, key))
            log.warning("model '%s' (%s) ignores the request field `%s` (logged once)", handle.name,
                        handle.config.backend, key)


# Request fields a local backend (transformers, llama.cpp) reads or that change nothing there; others are
# logged (once per model and field) as dropped.
LOCAL_FIELDS = frozenset({"presence_penalty", "frequency_penalty", "user", "stream_options", "parallel_tool_calls",
                          "tool_choice", "metadata", "store", "service_tier"})


def _backend_attributes(handle: ModelHandle, backend: Backend) -> dict[str, Any]:
    return {"gen_ai.request.model": handle.name, "slm_fusion.backend": handle.config.backend,
            "slm_fusion.upstream_model": handle.config.model, "slm_fusion.replica": handle.backends.index(backend)}


def _default_routers(config: FusionConfig) -> dict[str, routing.Router]:
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
    """Whole answers as a stream: one chunk per choice (its tool calls as one delta each, the reasoning layer's
    results beside it), then the usage."""
    for i, g in enumerate(gens):
        calls = [{"index": j, **c} for j, c in enumerate(g.tool_calls)] if g.tool_calls else None
        yield TokenChunk(index=i, text=g.text, finish_reason=g.finish_reason, tool_calls=calls,
                         reasoning=dict(g.reasoning) if g.reasoning is not None else None)
    yield TokenChunk(index=0, text="", usage=(gens[0].prompt_tokens if gens else 0,
                                              sum(g.completion_tokens for g in gens)),
                     reasoning_tokens=sum((g.reasoning or {}).get("reasoning_tokens", 0) for g in gens))


def route_headers(gw: Gateway, handle: ModelHandle, body: Any, decision: Any) -> dict[str, str]:
    """`x-slm-fusion-model` (who answered) and `x-slm-fusion-route` (router;path;score;reason), also counted and
    kept in `gw.recent_routes`: every decision that shaped an answer (a router's, a fallback's) passes here once."""
    headers = {"x-fusion-model": handle.name, "x-slm-fusion-model": handle.name}
    if decision is None:
        return headers
    route = decision.header() if hasattr(decision, "header") else str(getattr(decision, "reason", "") or "")
    route = route[:300].encode("ascii", "replace").decode()
    headers["x-slm-fusion-route"] = route
    if reason := getattr(decision, "reason", None):
        headers["x-fusion-route-reason"] = str(reason)[:200].encode("ascii", "replace").decode()
    headers.update(getattr(decision, "headers", None) or {})
    router = str(getattr(decision, "router", "") or "router")
    gw.metrics.routed.labels(body.model, router, handle.name).inc()
    score = getattr(decision, "score", None)
    gw.recent_routes.append({
        "t": round(time.time(), 3), "asked": body.model, "router": router, "model": handle.name,
        "score": float(score) if isinstance(score, int | float) else None,
        "reason": str(getattr(decision, "reason", "") or ""), "path": list(getattr(decision, "path", None) or []),
        "label": getattr(decision, "label", None),
    })
    return headers
