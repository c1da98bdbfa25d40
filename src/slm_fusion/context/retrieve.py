"""Retrieval into a chat: which stores a request asks for, the query, and the packed context with its citations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slm_fusion.context.store import Hit, StoreError

PREAMBLE = "Answer from these sources; say so when they do not hold the answer."


@dataclass(frozen=True)
class ContextRequest:
    vector_store_ids: tuple[str, ...]
    top_k: int
    max_context_tokens: int
    min_score: float
    hybrid_weight: float


def context_request(asked: Any, defaults: Any) -> ContextRequest | None:
    """`extra_body.context` ({vector_store_ids, top_k, max_context_tokens, min_score, hybrid_weight}) over the
    gateway's `context:` defaults; None when no store is asked for."""
    if asked is None:
        return None
    if not isinstance(asked, dict) or not isinstance(asked.get("vector_store_ids"), list) \
            or not asked["vector_store_ids"] or not all(isinstance(v, str) for v in asked["vector_store_ids"]):
        raise StoreError("context must be {\"vector_store_ids\": [\"vs_...\"], \"top_k\": N}", param="context")
    unknown = set(asked) - {"vector_store_ids", "top_k", "max_context_tokens", "min_score", "hybrid_weight"}
    if unknown:
        raise StoreError(f"context: unknown field(s) {', '.join(sorted(unknown))}", param="context")
    if defaults is None:
        raise StoreError("this gateway has no context store: add `context: {}` (and `embeddings: {}`) to its YAML",
                         param="context")
    pick = {k: asked.get(k, getattr(defaults, k)) for k in ("top_k", "max_context_tokens", "min_score",
                                                            "hybrid_weight")}
    if not isinstance(pick["top_k"], int) or not 1 <= pick["top_k"] <= 50:
        raise StoreError("context.top_k must be 1..50", param="context")
    return ContextRequest(tuple(asked["vector_store_ids"]), **pick)


def augment(messages: list[dict[str, Any]], hits: list[Hit], count_tokens: Callable[[str], int],
            max_tokens: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The messages with a system message of sources (best first, duplicates dropped, each marked `[n] filename`)
    that fits `max_tokens` of the serving model, and the citations of the sources used."""
    used, seen, parts, total = [], set(), [], count_tokens(PREAMBLE)
    for hit in hits:
        if hit.text in seen:
            continue
        block = f"[{len(used) + 1}] {hit.filename}\n{hit.text}"
        cost = count_tokens(block) + 1
        if total + cost > max_tokens:
            continue  # a shorter later chunk may still fit
        seen.add(hit.text)
        parts.append(block)
        used.append(hit)
        total += cost
    if not used:
        return messages, []
    sources = {"role": "system", "content": PREAMBLE + "\n\n" + "\n\n".join(parts)}
    first_user = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), 0)
    citations = [{"file_id": h.file_id, "filename": h.filename, "score": h.score, "text": h.text} for h in used]
    return [*messages[:first_user], sources, *messages[first_user:]], citations
