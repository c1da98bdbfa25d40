"""OpenTelemetry (slm_fusion.tracing): the spans of real requests — the official `openai` client, a real uvicorn
gateway, the mock upstream — read from the SDK's in-memory exporter, and the `traceparent` the upstream received."""

from __future__ import annotations

import io
import time

import openai
import pytest
from gateway_helpers import gateway_of, serve, serve_gateway, upstream_model
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from slm_fusion.app import create_app
from slm_fusion.backends.mock_upstream import MockUpstream
from slm_fusion.config import FusionConfig

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture(scope="module")
def traced(upstream, tmp_path_factory):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = FusionConfig.model_validate({
        "server": {"access_log": False},
        "models": [upstream_model("up", upstream.url), upstream_model("flaky", upstream.url, "fail-500")],
        "routing": {"fallbacks": {"flaky": ["up"]}},
        "routers": {"tiers": {"type": "rules", "default": "up"}},
        "virtual_models": {"by-tier": {"router": "tiers"}},
        "embeddings": {}, "context": {"path": str(tmp_path_factory.mktemp("ctx") / "context.db")},
    })
    with serve(create_app(config, tracer_provider=provider)) as served:
        yield openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0, timeout=120), exporter, upstream.mock


def _request_spans(exporter: InMemorySpanExporter, count: int = 1, timeout: float = 10.0) -> list:
    """The finished request spans of the trace: the server span ends as the last byte leaves, which may be just
    after the client has read it."""
    deadline = time.monotonic() + timeout
    while True:
        servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
        if len(servers) >= count:
            return servers
        assert time.monotonic() < deadline, f"{len(servers)} request span(s) finished, expected {count}"
        time.sleep(0.01)


def _children(exporter: InMemorySpanExporter, parent) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        if s.parent is not None and s.parent.span_id == parent.context.span_id:
            out.setdefault(s.name, []).append(s)
    return out


def _sent_traceparent(mock: MockUpstream) -> tuple[str, str]:
    _version, trace_id, span_id, _flags = mock.received_headers[-1]["traceparent"].split("-")
    return trace_id, span_id


def test_a_routed_chat_is_one_traced_request_with_its_routing_and_backend_spans(traced):
    client, exporter, mock = traced
    exporter.clear()
    r = client.chat.completions.create(model="by-tier", messages=MESSAGES, extra_headers={"traceparent": TRACEPARENT})
    [request] = _request_spans(exporter)
    assert request.name == "chat by-tier"
    assert f"{request.context.trace_id:032x}" == TRACE_ID  # the client's trace continues here
    assert f"{request.parent.span_id:016x}" == CLIENT_SPAN and request.parent.is_remote
    a = request.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "by-tier"
    assert a["gen_ai.response.model"] == "up"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (r.usage.prompt_tokens,
                                                                                  r.usage.completion_tokens)
    assert a["http.response.status_code"] == 200
    children = _children(exporter, request)
    [routing] = children["slm_fusion.routing"]
    assert routing.attributes["slm_fusion.route.model"] == "up" and routing.attributes["slm_fusion.router"] == "tiers"
    [backend] = children["slm_fusion.backend"]
    assert backend.kind == SpanKind.CLIENT and backend.attributes["gen_ai.request.model"] == "up"
    assert backend.attributes["slm_fusion.backend"] == "openai"
    assert backend.attributes["gen_ai.usage.output_tokens"] == r.usage.completion_tokens
    # The upstream was called inside the backend span, and told so; the body it got is the client's own.
    assert _sent_traceparent(mock) == (TRACE_ID, f"{backend.context.span_id:016x}")
    assert mock.received[-1] == {"model": "mock", "messages": MESSAGES}


def test_fallbacks_streams_and_reasoning_each_get_their_spans(traced):
    client, exporter, mock = traced
    exporter.clear()
    client.chat.completions.create(model="flaky", messages=MESSAGES)  # 500 upstream, then `up`
    [request] = _request_spans(exporter)
    failed, answered = sorted(_children(exporter, request)["slm_fusion.backend"], key=lambda s: s.start_time)
    assert (failed.attributes["gen_ai.request.model"], answered.attributes["gen_ai.request.model"]) == ("flaky", "up")
    assert failed.status.status_code == StatusCode.ERROR and answered.status.is_ok  # the failed attempt says so
    assert request.attributes["gen_ai.response.model"] == "up" and request.parent is None  # a new trace

    exporter.clear()
    chunks = list(client.chat.completions.create(model="up", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_headers={"traceparent": TRACEPARENT}))
    [request] = _request_spans(exporter)
    [backend] = _children(exporter, request)["slm_fusion.backend"]
    assert _sent_traceparent(mock) == (TRACE_ID, f"{backend.context.span_id:016x}")
    assert request.attributes["gen_ai.usage.output_tokens"] == chunks[-1].usage.completion_tokens

    exporter.clear()
    r = client.chat.completions.create(model="up", messages=MESSAGES, extra_body={"reasoning_budget": 40})
    [request] = _request_spans(exporter)
    [backend] = _children(exporter, request)["slm_fusion.backend"]
    [reasoning] = _children(exporter, backend)["slm_fusion.reasoning"]
    assert reasoning.attributes["slm_fusion.reasoning.mode"] == "cot"
    assert reasoning.attributes["slm_fusion.reasoning.budget"] == 40
    assert reasoning.attributes["slm_fusion.reasoning.forced"] == 0  # the mock answers within the budget
    assert request.attributes["slm_fusion.usage.reasoning_tokens"] == r.usage.completion_tokens_details.reasoning_tokens
    assert _sent_traceparent(mock)[1] == f"{reasoning.context.span_id:016x}"


def test_retrieval_is_a_child_span_of_the_request(traced):
    client, exporter, _ = traced
    doc = client.files.create(file=("prices.md", io.BytesIO(b"The Contour desk lamp costs 49.90 dollars.\n")),
                              purpose="assistants")
    store = client.vector_stores.create(name="prices", file_ids=[doc.id])
    exporter.clear()
    client.chat.completions.create(model="up", messages=[{"role": "user", "content": "How much is the lamp?"}],
                                   extra_body={"context": {"vector_store_ids": [store.id], "top_k": 2}})
    [request] = _request_spans(exporter)
    [retrieval] = _children(exporter, request)["slm_fusion.retrieval"]
    assert retrieval.attributes["slm_fusion.vector_store_ids"] == (store.id,)
    assert retrieval.attributes["slm_fusion.hits"] == 1
    assert retrieval.end_time <= _children(exporter, request)["slm_fusion.backend"][0].start_time


def test_tracing_off_makes_no_spans_and_sends_no_traceparent(upstream):
    with serve_gateway({"server": {"access_log": False}, "models": [upstream_model("up", upstream.url)]}) as served:
        assert gateway_of(served).tracer is None and gateway_of(served).tracer_provider is None
        c = openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0, timeout=20)
        c.chat.completions.create(model="up", messages=MESSAGES, extra_headers={"traceparent": TRACEPARENT})
    assert "traceparent" not in upstream.mock.received_headers[-1]


def test_sample_ratio_records_a_share_of_new_traces_and_follows_a_sampled_client():
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from slm_fusion.config import TracingConfig
    from slm_fusion.tracing import make_provider

    tracer = make_provider(TracingConfig(enabled=True, sample_ratio=0.0)).get_tracer("t")
    assert not tracer.start_span("new trace").is_recording()
    parent = TraceContextTextMapPropagator().extract({"traceparent": TRACEPARENT})  # flags 01: sampled
    assert tracer.start_span("continued", context=parent).is_recording()
    assert make_provider(TracingConfig()) is None  # off by default
