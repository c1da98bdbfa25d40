"""OpenTelemetry for the gateway (`tracing:` in the config, off by default): one span per request with the GenAI
semantic-convention attributes, children for the routing decision, retrieval, each backend call and the reasoning
layer, and the W3C `traceparent` sent on to OpenAI-compatible upstreams.

The request span is made by the gateway's middleware (`start_request` / `finish_request`): it continues the
client's `traceparent`/`tracestate` (the SDK's W3C propagator), is current for the whole request, streams included,
and is named `{gen_ai.operation.name} {gen_ai.request.model}` with the model and token counts once the answer is
complete. Not FastAPI's built-in telemetry, which would make the same span: its wrapper does its per-request work
(header extraction, attribute dicts, wrapped send/receive) whether or not the sampler keeps the trace, and in
benchmarks/bench_scale.py the middleware's span cost the gateway less CPU per request (docs/benchmarks.md). FastAPI's
is switched off, so that a global provider set by someone else does not turn it on.

    POST /v1/chat/completions  →  "chat smart"  (SERVER; gen_ai.request.model, gen_ai.response.model, usage)
      ├─ slm_fusion.routing     (a virtual model's router: router, chosen model, score, reason)
      ├─ slm_fusion.retrieval   (vector stores searched, hits)
      └─ slm_fusion.backend     (one per attempt: model, backend, replica; fallbacks add more)
           └─ slm_fusion.reasoning  (mode, budget, forced)   → upstream request with traceparent

Off means off: no provider, FastAPI's telemetry disabled, and every call site skips span work behind one
`tracer is None` test, so a gateway without `tracing:` pays nothing measurable.
"""

from __future__ import annotations

import contextlib
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from slm_fusion.config import TracingConfig

_PROPAGATOR = TraceContextTextMapPropagator()
_OFF: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/responses": "chat", "/v1/completions": "text_completion",
              "/v1/embeddings": "embeddings"}


def make_provider(config: TracingConfig) -> TracerProvider | None:
    """The SDK provider for `tracing:` (None when off); OTLP/HTTP export when `otlp_endpoint` is set."""
    if not config.enabled:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = SdkTracerProvider(resource=Resource.create({"service.name": config.service_name}),
                                 sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    if config.otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError("tracing.otlp_endpoint needs the OTLP exporter: pip install -e '.[otlp]' "
                             "(opentelemetry-exporter-otlp-proto-http==1.45.2)") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    return provider


# FastAPI's own telemetry stays off (see the module docstring); the gateway has its own metrics and logs.
FASTAPI_TELEMETRY_OFF = {"tracing": False, "metrics": False, "logs": False}


def start_request(tracer: Tracer, scope: dict, traceparent: bytes | None, tracestate: bytes | None) -> tuple:
    """The request span, current until `finish_request`; its parent is the client's span when it sent one."""
    parent = None
    if traceparent is not None:
        carrier = {"traceparent": traceparent.decode("latin-1")}
        if tracestate is not None:
            carrier["tracestate"] = tracestate.decode("latin-1")
        parent = _PROPAGATOR.extract(carrier)
    request_span = tracer.start_span(f"{scope['method']} {scope['path']}", context=parent, kind=SpanKind.SERVER,
                                     attributes={"http.request.method": scope["method"], "url.path": scope["path"]})
    return request_span, otel_context.attach(trace.set_span_in_context(request_span, parent))


def span(tracer: Tracer | None, name: str, attributes: dict[str, Any] | None = None,
         kind: SpanKind = SpanKind.INTERNAL) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one, current inside the block; a no-op when tracing is off."""
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def annotate(attributes: dict[str, Any]) -> None:
    """Set attributes on the current span (the reasoning layer's plan and outcome); nothing when none records."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def finish_request(started: tuple, scope: dict, status: int) -> None:
    """Name the request span after the GenAI operation and model, add what the request produced, and end it."""
    request_span, token = started
    otel_context.detach(token)
    if request_span.is_recording():
        operation = OPERATIONS.get(scope["path"])
        requested = scope.get("fusion.requested")
        attrs: dict[str, Any] = {"http.response.status_code": status,
                                 "slm_fusion.request_id": scope.get("fusion.request_id")}
        if operation:
            attrs["gen_ai.operation.name"] = operation
        if requested:
            attrs["gen_ai.request.model"] = requested
            request_span.update_name(f"{operation or scope['method']} {requested}")
        if model := scope.get("fusion.model"):
            attrs["gen_ai.response.model"] = model
        if usage := scope.get("fusion.usage"):
            attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"] = usage[0], usage[1]
            attrs["slm_fusion.usage.reasoning_tokens"] = usage[2]
        if route := scope.get("fusion.route"):
            attrs["slm_fusion.route"] = route
        request_span.set_attributes({k: v for k, v in attrs.items() if v is not None})
        if status >= 500:
            request_span.set_status(trace.StatusCode.ERROR, f"HTTP {status}")
    request_span.end()


def upstream_headers() -> dict[str, str] | None:
    """`traceparent` (and `tracestate`) of the current span for an upstream request; None when nothing is traced
    (an empty context: tracing off, or no span), so the untraced path adds no header and no work."""
    ctx = otel_context.get_current()
    if not ctx:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier or None
