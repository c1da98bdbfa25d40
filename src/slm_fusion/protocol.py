"""OpenAI wire format (pydantic) — the only module that knows OpenAI's JSON.

Requests keep unknown top-level fields on purpose (`extra="allow"`): the OpenAI SDK sends `extra_body` entries as
top-level keys, and our own extras (`reasoning_budget`, `pal`, `vote`) arrive that way. Known extras are typed
fields; the rest stay available in `model_extra` (and are forwarded to OpenAI-compatible upstreams).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# --------------------------------------------------------------------------------------------------- requests

StopField = Annotated[
    str | list[Annotated[str, Field(min_length=1)]] | None,
    Field(description="Up to 4 sequences where generation stops; the stop text is not returned."),
]


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of the conversation. Content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ReasoningExtras(BaseModel):
    """Extras understood by the reasoning layer (sent through the SDK's `extra_body`)."""

    reasoning_budget: int | None = Field(
        None, ge=0, le=1_000_000, description="Thinking-token budget (budget forcing) for the reasoning layer."
    )
    pal: bool | None = Field(None, description="Program-aided: the model writes a program that is executed.")
    vote: bool | None = Field(None, description="Self-consistency: sample `n` answers and return the majority.")


class SamplingFields(BaseModel):
    max_tokens: int | None = Field(None, ge=1, description="Maximum number of tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128, description="Number of choices to generate.")
    stop: StopField = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields, ReasoningExtras):
    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of `max_tokens`; takes precedence.")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields, ReasoningExtras):
    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1)
    prompt: str | list[str] = Field(..., description="Raw text; a list is accepted when it holds exactly one string.")
    echo: bool = False
    suffix: str | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1)
    input: str | list[str] = Field(..., description="Text or list of texts (token-id inputs are not supported).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# -------------------------------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: dict[str, int] | None = Field(
        None, description="Reasoning layer only: completion tokens split into reasoning_tokens and answer_tokens."
    )

    @model_serializer(mode="wrap")
    def _omit_details(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("completion_tokens_details") is None:
            data.pop("completion_tokens_details", None)
        return data


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends `role` only in the first delta; later deltas carry just `content`.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slm-fusion"
    # Our own additions, ignored by OpenAI clients: which backend serves it, or that it is routed.
    backend: str | None = None
    kind: Literal["model", "virtual", "embedding"] = "model"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "starting"]
    models: dict[str, Any]
