"""Prompt-prefix reuse for the transformers backend: the KV cache of recent prompts, bounded in bytes (LRU).

A new prompt that starts with the same tokens as a stored one (a system prompt, a few-shot block, a student's
training prompt) takes the stored keys/values for that common prefix and only the rest of the prompt is computed.
A token's keys/values depend only on the tokens before it (causal attention), so a stored prompt's first `m`
positions are exactly what a fresh prefill of any prompt sharing those `m` tokens would compute.

Written here because transformers has no prefix cache for a hand-driven decode loop: its own prefix sharing lives in
its continuous-batching manager, which runs on CPU but at a third of `generate`'s speed (see backends/transformers.py).
llama.cpp keeps its own, which the llama.cpp backend uses.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

MIN_TOKENS = 16  # a shorter common prefix saves less than the lookup and the cache copy cost

Layers = list[tuple[Any, Any]]  # per layer: keys, values (torch tensors shaped [1, heads, tokens, head_dim])


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """How many leading tokens two prompts share."""
    return len(os.path.commonprefix([tuple(a), tuple(b)]))  # element-wise, in C; one type, as it compares them


class PrefixCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        # (namespace, prompt) -> (layers, bytes); the namespace (an adapter) changes keys/values: never mixed
        self._entries: OrderedDict[tuple[Any, tuple[int, ...]], tuple[Layers, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0  # observability for tests and benchmarks
        self.misses = 0
        self.evictions = 0
        self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int], namespace: Any = None) -> tuple[int, Layers | None]:
        """The longest stored prefix of `ids` (at most len(ids) - 1 tokens, so one is left to compute): its length and
        its layers sliced to it, or (0, None)."""
        best, best_key = 0, None
        if len(ids) > MIN_TOKENS:
            query = tuple(ids[:-1])  # one token is always left to compute
            for key in self._entries:
                space, stored = key
                if space == namespace and len(stored) > best and (common := common_prefix(stored, query)) > best:
                    best, best_key = common, key
        if best < MIN_TOKENS:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.tokens_reused += best
        layers = self._entries[best_key][0]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in layers]

    def insert(self, ids: list[int], namespace: Any, layers: Layers) -> None:
        """Store a prompt's layers (tensors the caller no longer changes); the least recently used go first."""
        key = (namespace, tuple(ids))
        if any(k.shape[-2] != len(ids) for k, _ in layers):
            raise ValueError(f"prefix cache: {len(ids)} prompt tokens but layers of {layers[0][0].shape[-2]}")
        if len(ids) < MIN_TOKENS or key in self._entries:
            if key in self._entries:
                self._entries.move_to_end(key)
            return
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.capacity_bytes:
            return
        while self.bytes + size > self.capacity_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1
        self._entries[key] = (layers, size)
        self.bytes += size

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "tokens_reused": self.tokens_reused}
