"""`Example`: one question with its gold answer, and optionally a gold rationale (CoT) and a gold PAL program."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

EXAMPLE_FIELDS = ("id", "question", "answer", "rationale", "program", "domain", "metadata")


class Example(BaseModel):
    """One reasoning problem. Every data source (files, GSM8K, the retail-math generator) produces these."""

    id: str = Field(description="stable identifier, unique within a dataset")
    question: str = Field(description="the problem text shown to the model")
    answer: str | None = Field(None, description="gold final answer, normalised ('18', '2.5')")
    rationale: str | None = Field(None, description="gold chain of thought ending with 'The answer is X.'")
    program: str | None = Field(None, description="gold PAL program: 'def solution():' ... 'return x'")
    domain: str = Field("general", description="topic label used for reporting and routing, e.g. 'retail'")
    metadata: dict[str, Any] = Field(default_factory=dict, description="source-specific extras (template, steps...)")
