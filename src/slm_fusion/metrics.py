"""Prometheus metrics, one `CollectorRegistry` per app so several apps (tests, benchmarks) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "slm_fusion_requests", "Requests by model, route and HTTP status", ["model", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "slm_fusion_request_latency_seconds", "End-to-end request latency", ["model", "route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "slm_fusion_time_to_first_token_seconds", "Time to the first streamed token", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.tokens = Counter("slm_fusion_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.queue_depth = Gauge("slm_fusion_queue_depth", "Requests waiting for a backend slot", ["model"], registry=r)
        self.in_flight = Gauge("slm_fusion_in_flight", "Requests executing on a backend", ["model"], registry=r)
        self.routed = Counter(
            "slm_fusion_routed_requests", "Requests resolved through a virtual model, by router and model that answered",
            ["virtual_model", "router", "model"], registry=r,
        )

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(model, route, str(status)).inc()
        self.latency.labels(model, route).observe(seconds)

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self.tokens.labels(model, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(model, "completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
