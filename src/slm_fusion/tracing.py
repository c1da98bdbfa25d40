"""OpenTelemetry for the gateway (`tracing:` in the config, off by default): one span per request with the GenAI
semantic-convention attributes, children for the routing decision, retrieval, each backend call and the reasoning
layer, and the W3C `traceparent` sent on to OpenAI-compatible upstreams.

The request span is FastAPI's own HTTP server span (FastAPI's built-in telemetry, given our tracer provider: it
reads the client's `traceparent`/`tracestate` and makes the span current for the request). The gateway renames it
`{gen_ai.operation.name} {gen_ai.request.model}` and adds the model and token counts when the answer is complete.

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


def fastapi_telemetry(provider: TracerProvider | None) -> dict[str, Any]:
    """FastAPI's built-in telemetry settings: the HTTP server span from our provider, or nothing at all (FastAPI
    would otherwise pick up a global provider someone else configured). Its metrics and logs stay off: the gateway
    has its own Prometheus metrics and JSON logs."""
    if provider is None:
        return {"tracing": False, "metrics": False, "logs": False}
    return {"tracer_provider": provider, "metrics": False, "logs": False, "operation_spans": False}


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


def finish_request(scope: dict) -> None:
    """Name the request span after the GenAI operation and model, and add what the request produced: called when
    the last body frame leaves (FastAPI ends its span right after)."""
    current = trace.get_current_span()
    if not current.is_recording():
        return
    operation = OPERATIONS.get(scope["path"])
    requested = scope.get("fusion.requested")
    attrs: dict[str, Any] = {"slm_fusion.request_id": scope.get("fusion.request_id")}
    if operation:
        attrs["gen_ai.operation.name"] = operation
    if requested:
        attrs["gen_ai.request.model"] = requested
        current.update_name(f"{operation or scope['method']} {requested}")
    if model := scope.get("fusion.model"):
        attrs["gen_ai.response.model"] = model
    if usage := scope.get("fusion.usage"):
        attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"] = usage[0], usage[1]
        attrs["slm_fusion.usage.reasoning_tokens"] = usage[2]
    if route := scope.get("fusion.route"):
        attrs["slm_fusion.route"] = route
    current.set_attributes({k: v for k, v in attrs.items() if v is not None})


def upstream_headers() -> dict[str, str] | None:
    """`traceparent` (and `tracestate`) of the current span for an upstream request; None when nothing is traced
    (an empty context: tracing off, or no span), so the untraced path adds no header and no work."""
    ctx = otel_context.get_current()
    if not ctx:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier or None
