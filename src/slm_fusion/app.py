"""`create_app(config)`: the OpenAI-compatible FastAPI gateway — the factory and its routes, nothing more.

The rooms, and the path of one chat request through them:
  `middleware.GatewayMiddleware` (pure ASGI: request id, auth, body-size limit, access log, metrics, last-resort 500)
  → route here (`/v1/chat/completions`, `/v1/completions`, ...; the body parsed by `protocol`)
  → `serving.complete` (JSON) or its stream path (SSE)
  → `gateway.Gateway.resolve_target` (model name → deployment; routers from `routing` plug in here)
    and `Gateway.generation_request` (the wire body → a typed `GenerationRequest`)
  → `Gateway.generate_routed` / `open_stream` (plans, then `routing.fallbacks` along the chain)
  → `deployments.ModelHandle.slot()` (bounded queue: 429 when full; least busy healthy replica)
  → `Gateway.execute` (the one place a generation runs; `reasoning` wraps it) → `backends/*`.

Two seams, both optional arguments of `create_app`: `routers={"virtual-name": router}` (default
`routing.build_routers` when the config declares `virtual_models`) and `reasoning=layer` (default
`reasoning.make_reasoning_layer(config)`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from reasonlite.config import field_path
from slm_fusion import protocol as P
from slm_fusion.backends.base import Backend
from slm_fusion.config import FusionConfig, ModelBase
from slm_fusion.context.routes import add_context_routes
from slm_fusion.deployments import UpstreamEmbedder
from slm_fusion.errors import FusionError, InvalidRequest, ModelNotFound, NotFound, ValidationFailed, error_body
from slm_fusion.gateway import Gateway
from slm_fusion.middleware import GatewayMiddleware, configure_logging
from slm_fusion.serving import admit_model, complete, count_tokens, json_response, model_response, respond
from slm_fusion.tracing import FASTAPI_TELEMETRY_OFF
from slm_fusion.ui import add_ui_routes

__all__ = ["configure_logging", "create_app"]

log = logging.getLogger("slm_fusion")


def _error_response(err: FusionError) -> Response:
    try:
        return json_response(err.to_dict(), err.status, err.headers)
    except TypeError:  # a message that quotes the client's own invalid text (a lone surrogate): escape it
        return Response(json.dumps(err.to_dict()), status_code=err.status, media_type="application/json",
                        headers=err.headers)


def create_app(
    config: FusionConfig,
    *,
    backends: dict[str, list[Backend]] | None = None,
    routers: dict[str, Any] | None = None,
    reasoning: Any | None = None,
    tracer_provider: Any | None = None,
) -> FastAPI:
    """Build the gateway. `backends` overrides the config's backend instances per model name (tests, embedding);
    `tracer_provider` is an OpenTelemetry provider to trace with (tests: the SDK's in-memory exporter), else the
    config's `tracing:` section decides."""
    gw = Gateway(config, backends=backends, routers=routers, reasoning=reasoning, tracer_provider=tracer_provider)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:  # uvicorn lets in-flight requests finish before the lifespan ends
            await gw.aclose()

    app = FastAPI(title="SLM-Fusion", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway serving several small language models.",
                  telemetry=FASTAPI_TELEMETRY_OFF)  # the request span is the middleware's (slm_fusion.tracing)
    app.state.gateway = gw
    _install_error_handlers(app)
    app.add_middleware(GatewayMiddleware, gateway=gw)
    errors = {s: {"model": P.ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 502, 503, 504)}
    server = config.server

    @app.post("/v1/chat/completions", responses={200: {"model": P.ChatCompletionResponse}, **errors})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        return await complete(gw, body, request, chat=True)

    @app.post("/v1/completions", responses={200: {"model": P.CompletionResponse}, **errors})
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        return await complete(gw, body, request, chat=False)

    add_context_routes(app, gw, json_response)  # /v1/files, /v1/vector_stores (slm_fusion.context)
    if config.ui.enabled:
        add_ui_routes(app, gw, json_response)  # the web console: /ui pages, /ui/api data (slm_fusion.ui)

    @app.post("/v1/responses", responses=errors)
    async def responses(body: P.ResponsesRequest, request: Request) -> Response:
        return await respond(gw, body, request)

    @app.get("/v1/models", response_model=P.ModelList)
    async def list_models() -> Response:
        return model_response(P.ModelList(data=_model_cards(gw)))

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses={404: {"model": P.ErrorResponse}})
    async def get_model(model_id: str) -> Response:
        for card in _model_cards(gw):
            if card.id == model_id:
                return model_response(card)
        raise ModelNotFound(model_id, [c.id for c in _model_cards(gw)])

    @app.post("/v1/embeddings", responses={200: {"model": P.EmbeddingResponse}, **errors})
    async def embeddings(body: P.EmbeddingRequest, request: Request) -> Response:
        if gw.embedder is None or body.model != gw.embedder.config.name:
            available = [gw.embedder.config.name] if gw.embedder else []
            raise ModelNotFound(body.model, available)
        admit_model(gw, request, body.model)
        request.scope["fusion.model"] = body.model
        if isinstance(gw.embedder, UpstreamEmbedder):  # the body as sent, the upstream's answer as given
            fields = getattr(request, "_json", None)  # Starlette's parse of the body, kept by FastAPI
            async with asyncio.timeout(server.request_timeout_s):
                content, tokens = await gw.embedder.forward(fields if isinstance(fields, dict)
                                                            else body.model_dump(exclude_unset=True))
            count_tokens(gw, request, body.model, tokens, 0)
            return Response(content, media_type="application/json")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if any(not isinstance(t, str) for t in texts):
            raise InvalidRequest(f"model '{body.model}' embeds text only: send `input` as a string or a list of "
                                 "strings, not token ids", param="input")
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
        count_tokens(gw, request, body.model, tokens, 0)
        return json_response({"object": "list", "data": data, "model": body.model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/health", response_model=P.HealthResponse)
    async def health() -> Response:
        models = {
            name: {"state": h.state, "backend": h.config.backend, "in_flight": h.admitted - h.waiting,
                   "queued": h.waiting}
            for name, h in gw.handles.items()
        }
        ok = all(h.state == "ready" for h in gw.handles.values())
        return json_response({"status": "ok" if ok else "starting", "models": models})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=gw.metrics.content_type)

    return app


def _model_cards(gw: Gateway) -> list[P.ModelCard]:
    cards = [P.ModelCard(id=n, created=gw.created, backend=h.config.backend, max_output_tokens=h.config.max_output_tokens,
                         default_max_tokens=_default_cap(h.config)) for n, h in gw.handles.items()]
    cards += [P.ModelCard(id=n, created=gw.created, kind="virtual") for n in gw.routers if n not in gw.handles]
    if gw.embedder:
        cards.append(P.ModelCard(id=gw.embedder.config.name, created=gw.created, backend=gw.embedder.config.backend,
                                 kind="embedding"))
    return cards


def _default_cap(cfg: ModelBase) -> int | None:
    """The output cap a request without max_tokens gets: local models always have one; an upstream decides for
    itself unless `default_max_tokens` is configured for it."""
    if cfg.backend == "openai" and "default_max_tokens" not in cfg.model_fields_set:
        return None
    return min(cfg.default_max_tokens, cfg.max_output_tokens or cfg.default_max_tokens)


# ------------------------------------------------------------------------------------------- completion endpoints


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FusionError)
    async def fusion_error(request: Request, exc: FusionError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error_response(InvalidRequest(f"could not parse the JSON body: {first.get('msg')}"))
        # OpenAI's shape: `param` is the first bad field, the message lists up to five (not the config formatter's
        # multi-line text); FastAPI's `body` wrapper is no part of the field's name.
        param = field_path(first.get("loc", ()), skip=("body",), empty="") or None
        message = "; ".join(f"{field_path(e.get('loc', ()), skip=('body',), empty='body')}: {e.get('msg')}"
                            for e in errors[:5])
        return _error_response(ValidationFailed(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err: FusionError = NotFound(f"No route {request.method} {request.url.path}")
        else:
            err = InvalidRequest(str(exc.detail))
            err.status = exc.status_code
        return json_response(err.to_dict(), exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return json_response(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)


# ------------------------------------------------------------------------------------------------------ logging
