"""Retrieval into a chat: which stores a request asks for, the query, and the packed context with its citations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from reasonlite.formats import SOURCES_PREAMBLE, source_block, sources_message
from slm_fusion.context.settings import KNOBS, ModelContext, RetrievalSettings
from slm_fusion.context.store import Hit, StoreError


@dataclass(frozen=True)
class ContextRequest:
    vector_store_ids: tuple[str, ...]
    top_k: int
    max_context_tokens: int
    min_score: float
    hybrid_weight: float
    diversity: float


def context_request(asked: Any, defaults: RetrievalSettings | None,
                    declared: ModelContext | None = None) -> ContextRequest | None:
    """What a chat retrieves, field by field: the request's `extra_body.context` ({vector_store_ids, top_k,
    max_context_tokens, min_score, hybrid_weight, diversity}) over the `context:` its model declares, over the gateway's
    `context:` defaults; None when neither the request nor its model names a store."""
    if asked is None and declared is None:
        return None
    if asked is not None and not isinstance(asked, dict):
        raise StoreError("context must be {\"vector_store_ids\": [\"vs_...\"], \"top_k\": N}", param="context")
    asked = asked or {}
    ids = asked.get("vector_store_ids", declared.vector_store_ids if declared is not None else None)
    if not isinstance(ids, list) or not ids or not all(isinstance(v, str) for v in ids):
        raise StoreError("context.vector_store_ids must be a non-empty list of ids: {\"vector_store_ids\": "
                         "[\"vs_...\"]}", param="context")
    unknown = set(asked) - {"vector_store_ids", *KNOBS}
    if unknown:
        raise StoreError(f"context: unknown field(s) {', '.join(sorted(unknown))}; known: vector_store_ids, "
                         f"{', '.join(KNOBS)}", param="context")
    if defaults is None:
        raise StoreError("this gateway has no context store: add `context: {}` (and `embeddings: {}`) to its YAML",
                         param="context")
    knobs = {k: getattr(defaults, k) for k in KNOBS}
    if declared is not None:
        knobs.update({k: getattr(declared, k) for k in declared.model_fields_set & set(KNOBS)})
    knobs.update({k: asked[k] for k in KNOBS if k in asked})
    try:  # the request's knobs are checked against the same declarations as the YAML's
        checked = RetrievalSettings.model_validate(knobs, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        raise StoreError(f"context.{err['loc'][0]}: {err['msg']}", param="context") from None
    return ContextRequest(tuple(ids), **checked.model_dump())


def augment(messages: list[dict[str, Any]], hits: list[Hit], count_tokens: Callable[[str], int],
            max_tokens: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The messages with a system message of sources (best first, duplicates dropped, each marked `[n] filename`)
    that fits `max_tokens` of the serving model, and the citations of the sources used. The message is
    reasonlite's `sources_message`, the one its students are trained and evaluated with."""
    used: list[Hit] = []
    seen, total = set(), count_tokens(SOURCES_PREAMBLE)
    for hit in hits:
        if hit.text in seen:
            continue
        cost = count_tokens(source_block(len(used) + 1, hit)) + 1
        if total + cost > max_tokens:
            continue  # a shorter later chunk may still fit
        seen.add(hit.text)
        used.append(hit)
        total += cost
    if not used:
        return messages, []
    sources = sources_message(used)
    first_user = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), 0)
    citations = [{"file_id": h.file_id, "filename": h.filename, "score": h.score, "text": h.text} for h in used]
    return [*messages[:first_user], sources, *messages[first_user:]], citations
