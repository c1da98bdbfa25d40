"""The completion endpoints' work, written once for chat and text completions: a whole JSON answer, or an SSE
stream whose first token is awaited before the 200 (so a failure up to then gets a real status or a fallback), and
the client's disconnect cancelling the work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from reasonlite.config import field_path
from reasonlite.data.example import Source
from slm_fusion import protocol as P
from slm_fusion import tracing
from slm_fusion.backends.base import GenerationRequest
from slm_fusion.deployments import ModelHandle
from slm_fusion.errors import ClientDisconnected, FusionError, GatewayTimeout, InvalidRequest, error_body
from slm_fusion.gateway import Gateway, route_headers
from slm_fusion.routing import ExecutionPlan

log = logging.getLogger("slm_fusion")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_WATCH_AFTER_S = 0.05  # a client that leaves a request running longer than this cancels it


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def model_response(model: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def admit_model(gw: Gateway, request: Request, model: str) -> None:
    """The model a request asks for, noted for the ledger and the request span; refused (403) when the request's
    database key may not use it."""
    request.scope["fusion.requested"] = model
    if (key := request.scope.get("fusion.key")) is not None:
        gw.keys.check_model(key, model)


def count_tokens(gw: Gateway, request: Request, model: str, prompt: int, completion: int, reasoning: int = 0) -> None:
    """A finished request's tokens: the Prometheus counters, and the scope the ledger row and the span read."""
    gw.metrics.observe_tokens(model, prompt, completion)
    request.scope["fusion.usage"] = (prompt, completion, reasoning)


async def complete(gw: Gateway, body: Any, request: Request, *, chat: bool,
                   sent: dict[str, Any] | None = None) -> Response:
    admit_model(gw, request, body.model)
    handle, decision = await gw.resolve_target(body, request.headers)
    request.scope["fusion.model"] = handle.name
    if body.n > 1 and isinstance(decision, ExecutionPlan):
        raise InvalidRequest(f"'{body.model}' answers with one choice (its router runs a plan over several models); "
                             "send n=1 or call a model directly", param="n")
    # FastAPI parsed the body with Starlette's `request.json()`, which keeps the parsed object: the fields exactly
    # as sent, without a second parse or a dump of the validated model.
    raw = getattr(request, "_json", None) if sent is None else sent
    citations = None
    if chat:
        # A virtual model's own `context:` first, else the one of the model that serves the request.
        declared = gw.config.declared_context(body.model) or gw.config.declared_context(handle.name)
        asked = (body.model_extra or {}).get("context")
        if asked is not None or declared is not None:
            body, raw, citations = await _with_context(gw, handle, body, raw, asked, declared)
    # the sources ride along: a student prompt the reasoning layer rebuilds keeps them (slm_fusion.reasoning)
    sources = [Source(filename=c["filename"], text=c["text"]) for c in citations or []]
    gen = gw.generation_request(handle, body, P.sent_fields(body, raw), sources)
    timeout = handle.timeout(gw.config.server.request_timeout_s)
    if body.stream:
        return await _stream(gw, handle, gen, body, chat, timeout, decision, request, citations)
    async with _cancel_on_disconnect(request):
        handle, gens, decision = await gw.generate_routed(handle, decision, body, gen)
    request.scope["fusion.model"] = handle.name
    headers = route_headers(gw, handle, body, decision)
    request.scope["fusion.route"] = headers.get("x-slm-fusion-route", "")
    prompt_tokens = gens[0].prompt_tokens if gens else 0
    completion_tokens = sum(g.completion_tokens for g in gens)
    details = None
    if any(g.reasoning is not None for g in gens):
        from slm_fusion.reasoning import usage_details

        details = usage_details(gens)
    count_tokens(gw, request, handle.name, prompt_tokens, completion_tokens,
                 details["reasoning_tokens"] if details else 0)
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
                                        logprobs=P.completion_logprobs(g.logprobs, len(prefix))[0])
                     for i, g in enumerate(gens)],
        )
    # Routing extras (e.g. output fusion's `slm_fusion: {agreement, votes}`) ride along as extra response fields.
    extra = {k: v for k, v in (getattr(decision, "extra", None) or {}).items() if not k.startswith("_")}
    if details is not None or citations is not None:  # per-choice results: the reasoning layer's, the sources used
        data = resp.model_dump(mode="json")
        for choice, g in zip(data["choices"], gens):
            if g.reasoning is not None:
                choice["slm_fusion"] = dict(g.reasoning)
            if citations is not None:
                choice.setdefault("slm_fusion", {})["citations"] = citations
        return json_response({**data, **extra}, headers=headers)
    if extra:
        return json_response({**resp.model_dump(mode="json"), **extra}, headers=headers)
    return model_response(resp, headers)


async def _with_context(gw: Gateway, handle: ModelHandle, body: Any, raw: Any, asked: Any,
                        declared: Any) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """Retrieval for a chat asking for `context`, or sent to a model that declares one (slm_fusion.context): the
    request with the sources packed into a system message, the fields to send upstream (without `context`), and
    the citations."""
    from slm_fusion.context import augment, context_request

    ctx = context_request(asked, gw.config.context, declared)
    query = next((m.text() for m in reversed(body.messages) if m.role == "user"), "")
    with tracing.span(gw.tracer, "slm_fusion.retrieval", {"slm_fusion.vector_store_ids": list(ctx.vector_store_ids),
                                                          "slm_fusion.top_k": ctx.top_k}) as traced:
        hits = await asyncio.to_thread(gw.context.search, list(ctx.vector_store_ids), query, ctx.top_k, None,
                                       ctx.min_score, ctx.hybrid_weight, diversity=ctx.diversity)
        if traced is not None:
            traced.set_attribute("slm_fusion.hits", len(hits))
    fields = {"model": body.model, **raw} if isinstance(raw, dict) else body.model_dump(exclude_unset=True)
    fields.pop("context", None)
    fields["messages"], citations = augment(list(fields["messages"]), hits, handle.backends[0].count_tokens,
                                            ctx.max_context_tokens)
    return type(body).model_validate(fields), fields, citations


async def _stream(
    gw: Gateway, handle: ModelHandle, gen: GenerationRequest, body: Any, chat: bool, timeout: float,
    decision: Any, request: Request, citations: list[dict[str, Any]] | None = None,
) -> Response:
    """SSE stream. The first token is awaited before answering, so failures up to then get a real status code
    (or the next model of `routing.fallbacks` is tried)."""
    start = time.perf_counter()
    async with _cancel_on_disconnect(request):  # until the first chunk; then the response watches for itself
        handle, stack, chunks, first, deadline, decision = await gw.open_stream(handle, decision, body, gen)
    request.scope["fusion.model"] = handle.name
    headers = route_headers(gw, handle, body, decision)
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

    # text completions' logprobs: where each choice's next token starts (`text_offset`), after an echoed prompt
    offsets = dict.fromkeys(range(gen.n), len(gen.prompt) if not chat and body.echo else 0)

    def choice(index: int, text: str | None, finish: str | None, role: bool = False, tool_calls: Any = None,
               logprobs: Any = None) -> Any:
        if chat:
            delta = P.ChoiceDelta(role="assistant" if role else None, content=text, tool_calls=tool_calls)
            return P.ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
        if logprobs:  # text offsets run on over the choice's chunks
            logprobs, offsets[index] = P.completion_logprobs(logprobs, offsets.get(index, 0))
        return P.CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=logprobs)

    async def events() -> AsyncIterator[bytes]:
        nonlocal ttft_seen
        usage: tuple[int, int] | None = None
        reasoning_tokens = 0
        counted = 0
        try:
            if chat:
                for i in range(gen.n):
                    yield frame([choice(i, "", None, role=True)])
                if citations is not None:  # the sources used, once, before the text
                    yield b"data: " + orjson.dumps(P.details_chunk(
                        cid, created, body.model, {i: {"citations": citations} for i in range(gen.n)})) + b"\n\n"
            elif body.echo:
                for i in range(gen.n):
                    yield frame([choice(i, gen.prompt, None)])
            chunk = first
            while chunk is not None:
                if chunk.usage is not None:
                    usage = chunk.usage
                    reasoning_tokens = chunk.reasoning_tokens or 0
                if chunk.reasoning is not None and chat:  # the reasoning layer's results, just before the answer
                    yield b"data: " + orjson.dumps(P.details_chunk(cid, created, body.model,
                                                                   {chunk.index: chunk.reasoning})) + b"\n\n"
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
            count_tokens(gw, request, handle.name, prompt_tokens, completion_tokens, reasoning_tokens)
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


async def respond(gw: Gateway, body: P.ResponsesRequest, request: Request) -> Response:
    """`/v1/responses`: the request runs as one chat completion (`complete`: routing, fallbacks, reasoning, tools,
    structured outputs alike) and its answer is written back as a Responses object, or as Responses events."""
    try:
        chat = body.to_chat()
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidRequest(f"{field_path(err['loc'])}: {err['msg']}",
                             param=str(err["loc"][0]) if err["loc"] else None) from None
    except ValueError as e:
        raise InvalidRequest(str(e), param=str(e).split("[", 1)[0].split(":", 1)[0]) from None
    inner = await complete(gw, chat, request, chat=True, sent=P.sent_fields(chat))
    headers = {k: v for k, v in inner.headers.items() if k.startswith("x-slm-fusion")}
    if not body.stream:
        return json_response(P.response_from_chat(body, orjson.loads(inner.body)), headers=headers)
    translate = P.ResponseEvents(body)

    def sse(events: list[dict[str, Any]]) -> bytes:
        return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)

    async def events() -> AsyncIterator[bytes]:
        yield sse(translate.start())
        async for frame in inner.body_iterator:  # the chat stream's frames, already encoded once
            if frame.startswith(b"data: {") and (out := translate.feed(orjson.loads(frame[6:]))):
                yield sse(out)
        yield sse(translate.finish_events())

    return _SSEResponse(events(), inner._cleanup, headers={**SSE_HEADERS, **headers})


class _cancel_on_disconnect:  # lower case: used like the function it replaced, `async with _cancel_on_disconnect(r)`
    """Cancel the block when the client disconnects: its queue slot, local generation or upstream call end there,
    and no fallback is tried for a client that is gone (ClientDisconnected, logged as 499).

    Most answers come back faster than a client gives up: listening starts only after DISCONNECT_WATCH_AFTER_S,
    which keeps a task per request off the hot path. A class, not @asynccontextmanager: it runs on every request,
    and the generator machinery cost more than the rest of it."""

    __slots__ = ("_gone", "_request", "_task", "_timer", "_watcher")

    def __init__(self, request: Request) -> None:
        self._request = request

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        self._gone = False
        self._watcher: asyncio.Task | None = None
        self._timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_AFTER_S, self._start_watching)

    def _start_watching(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._request.receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> bool:
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if exc_type is asyncio.CancelledError and self._gone:
            self._task.uncancel()
            raise ClientDisconnected("the client closed the connection before the answer was ready") from None
        return False


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
