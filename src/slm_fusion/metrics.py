"""Prometheus metrics, one `CollectorRegistry` per app so several apps (tests, benchmarks) never share counters, and
the per-model series the web console charts, computed from them (`MetricSeries`)."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

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


class MetricSeries:
    """Per-model request rate, p50/p95 latency and tokens/s over time, for the web console's charts.

    Computed from the registry above, never counted twice: a bounded ring of snapshots of its counters and of the
    latency histogram's buckets, and each point is the difference of two neighbouring snapshots — what Prometheus's
    `rate()` and `histogram_quantile()` do, without running a Prometheus. A snapshot is taken when the series is
    read and the last one is at least `interval_s` old, so nothing runs while nobody is looking.
    """

    def __init__(self, metrics: GatewayMetrics, interval_s: float, points: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self._snapshots: deque[tuple[float, dict[str, _Totals]]] = deque(maxlen=points + 1)

    def read(self) -> dict[str, list[dict[str, float | None]]]:
        """Model -> points `{t, requests_per_s, p50_ms, p95_ms, tokens_per_s}` (latency None with no request)."""
        now = self.clock()
        if not self._snapshots or now - self._snapshots[-1][0] >= self.interval_s:
            self._snapshots.append((now, _totals(self.metrics.registry)))
        out: dict[str, list[dict[str, float | None]]] = {}
        for (t0, before), (t1, after) in itertools.pairwise(self._snapshots):
            dt = t1 - t0
            for model, now_totals in after.items():
                was = before.get(model) or _Totals(0.0, 0.0, [0.0] * len(now_totals.buckets))
                buckets = [b - a for a, b in zip(was.buckets, now_totals.buckets)]
                out.setdefault(model, []).append({
                    "t": round(t1, 3),
                    "requests_per_s": (now_totals.requests - was.requests) / dt,
                    "p50_ms": _quantile(0.5, buckets), "p95_ms": _quantile(0.95, buckets),
                    "tokens_per_s": (now_totals.completion_tokens - was.completion_tokens) / dt,
                })
        return out


@dataclass
class _Totals:
    requests: float
    completion_tokens: float
    buckets: list[float]  # cumulative latency bucket counts, LATENCY_BUCKETS then +Inf, summed over routes


def _totals(registry: CollectorRegistry) -> dict[str, _Totals]:
    """The running totals per model, read from the registry's public `collect()` (the /metrics text's samples)."""
    out: dict[str, _Totals] = {}

    def of(model: str) -> _Totals:
        return out.setdefault(model, _Totals(0.0, 0.0, [0.0] * (len(LATENCY_BUCKETS) + 1)))

    for family in registry.collect():
        for s in family.samples:
            model = s.labels.get("model")
            if not model:  # requests that named no model: /health, /metrics, the console's own pages
                continue
            if s.name == "slm_fusion_requests_total":
                of(model).requests += s.value
            elif s.name == "slm_fusion_tokens_total" and s.labels.get("kind") == "completion":
                of(model).completion_tokens += s.value
            elif s.name == "slm_fusion_request_latency_seconds_bucket":
                le = s.labels["le"]
                i = len(LATENCY_BUCKETS) if le == "+Inf" else LATENCY_BUCKETS.index(float(le))
                of(model).buckets[i] += s.value
    return out


def _quantile(q: float, cumulative: list[float]) -> float | None:
    """Prometheus's `histogram_quantile` on one interval's cumulative bucket counts, in milliseconds: linear within
    the bucket holding the q-th observation; past the last finite bound, that bound. None when nothing was observed.
    Written here because prometheus-client exposes histograms but computes no quantiles."""
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(LATENCY_BUCKETS, cumulative):
        if count >= rank:
            share = (rank - below) / (count - below) if count > below else 1.0
            return 1000 * (lower + (bound - lower) * share)
        lower, below = bound, count
    return 1000 * LATENCY_BUCKETS[-1]
