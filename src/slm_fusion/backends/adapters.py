"""Multi-LoRA serving: gateway models that are LoRA adapters on one shared transformers base.

Every model with `adapter:` set and the same base (`model`, dtype, device) runs on one `TransformersBackend`, the
engine: one copy of the base weights, one decode loop, and batches that mix adapters (each row names its adapter;
PEFT's mixed-batch forward applies each adapter to its own rows). The engine loads an adapter the first time a
request needs it and keeps at most `max_adapters` loaded (least recently used unloaded first). Routers route to
adapter models like to any model: to the gateway they are models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from slm_fusion.backends.base import Generation, GenerationRequest, TokenChunk
from slm_fusion.config import TransformersModel


class AdapterBackend:
    """One gateway model: its requests go to the shared engine with this model's adapter."""

    def __init__(self, config: TransformersModel, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self.supports_response_format = engine.supports_response_format
        self.supports_logprobs = engine.supports_logprobs

    async def start(self) -> None:
        await self.engine.start()  # the engine starts once, however many models share it

    async def aclose(self) -> None:
        await self.engine.aclose()

    def _mine(self, req: GenerationRequest) -> GenerationRequest:
        return dataclasses.replace(req, adapter=self.config.adapter)

    async def generate(self, req: GenerationRequest) -> list[Generation]:
        return await self.engine.generate(self._mine(req))

    def stream(self, req: GenerationRequest) -> AsyncIterator[TokenChunk]:
        return self.engine.stream(self._mine(req))

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def format_chat(self, messages: list[dict[str, Any]]) -> str:
        return self.engine.format_chat(messages)


def adapter_backend(config: TransformersModel, shared: dict[Any, Any]) -> AdapterBackend:
    """The k-th replica of an adapter model runs on the k-th engine of its base (created on first use)."""
    from slm_fusion.backends.transformers import TransformersBackend

    key = ("adapter-base", config.model, config.dtype, config.device)
    engines: list[Any] = shared.setdefault(key, [])
    replica = shared.setdefault(("adapter-replica", config.name), 0)
    shared[("adapter-replica", config.name)] = replica + 1
    if replica == len(engines):
        base = config.model_copy(update={"name": f"{config.model} (shared base)", "adapter": None})
        engines.append(TransformersBackend(base))
    return AdapterBackend(config, engines[replica])
