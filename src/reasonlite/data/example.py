"""`Example`: one question with its gold answer, and optionally a gold rationale (CoT), a gold PAL program and the
context (the `Source`s) the answer depends on."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

EXAMPLE_FIELDS = ("id", "question", "answer", "rationale", "program", "domain", "metadata", "context")


class Source(BaseModel):
    """One document (or chunk) a question is answered from, shown to a model as `[n] filename` + text
    (`reasonlite.formats.sources_message`, the message the gateway's retrieval sends too)."""

    filename: str = Field(description="name shown in the `[n] filename` line, e.g. 'catalog-aria-kettle.md'")
    text: str = Field(description="the document or chunk text")


class Example(BaseModel):
    """One reasoning problem. Every data source (files, GSM8K, the retail-math generator) produces these."""

    id: str = Field(description="stable identifier, unique within a dataset")
    question: str = Field(description="the problem text shown to the model")
    answer: str | None = Field(None, description="gold final answer, normalised ('18', '2.5')")
    rationale: str | None = Field(None, description="gold chain of thought ending with 'The answer is X.'")
    program: str | None = Field(None, description="gold PAL program: 'def solution():' ... 'return x'")
    domain: str = Field("general", description="topic label used for reporting and routing, e.g. 'retail'")
    metadata: dict[str, Any] = Field(default_factory=dict, description="source-specific extras (template, steps...)")
    context: list[Source] | None = Field(None, description="gold sources the answer depends on (None = the question "
                                                           "stands alone)")
