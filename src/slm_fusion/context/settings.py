"""The retrieval knobs of the gateway YAML, declared once: the gateway's `context:` section holds their defaults, a
model or virtual model may declare its own `context:` (its stores and any knob it changes), and a request's
`extra_body.context` (or the Responses API's `file_search` tool) overrides field by field.

    context: {path: context.db, top_k: 5}                                   # the store and the gateway's defaults
    models:
      - {name: shop, backend: openai, ..., context: {vector_store_ids: [vs_abc], top_k: 3}}
    virtual_models:
      auto: {router: topic, context: {vector_store_ids: [vs_abc]}}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RetrievalSettings(BaseModel):
    """How many chunks a chat retrieves, how they are ranked, and how much of the prompt they may take."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(5, ge=1, le=50, description="Chunks retrieved per request when the request does not say.")
    max_context_tokens: int = Field(
        1500, ge=16, description="Retrieved text packed into the prompt, at most (serving model's tokens).")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="Chunks scoring below this are not used.")
    hybrid_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="Weight of the dense (embedding) ranking against BM25 in the fused score.")
    diversity: float = Field(
        0.0, ge=0.0, lt=1.0, description="MMR: demote chunks close to ones already picked (0 = by score alone).")


KNOBS = tuple(RetrievalSettings.model_fields)


class ModelContext(RetrievalSettings):
    """A model's own retrieval: every chat to it retrieves from `vector_store_ids` without asking; the knobs it does
    not set come from the gateway's `context:` section."""

    vector_store_ids: list[str] = Field(
        ..., min_length=1, description="Vector stores searched for every chat to this model (ids from "
                                       "POST /v1/vector_stores or `slm-fusion store list`).")


MODEL_CONTEXT_DESCRIPTION = "Retrieval for every chat to this name (stores + knobs); a request's `context` overrides."
