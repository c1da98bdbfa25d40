"""OpenAI wire format (pydantic) — the only module that knows OpenAI's JSON.

Requests keep unknown top-level fields on purpose (`extra="allow"`): the OpenAI SDK sends `extra_body` entries as
top-level keys, and our own extras (`reasoning_budget`, `pal`, `vote`) arrive that way. Known extras are typed
fields; the rest stay available in `model_extra` (and are forwarded to OpenAI-compatible upstreams).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

# --------------------------------------------------------------------------------------------------- requests

StopField = Annotated[
    str | list[Annotated[str, Field(min_length=1)]] | None,
    Field(description="Up to 4 sequences where generation stops; the stop text is not returned."),
]


class ContentPart(BaseModel):
    """One part of a message's content: `text`, or another kind (`image_url`, `input_audio`, `file`) kept as sent
    for OpenAI-compatible upstreams; local text models refuse the non-text kinds."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(..., min_length=1)
    text: str | None = None

    @model_validator(mode="after")
    def _text_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a `text` content part needs a `text` string")
        return self


class ChatMessage(BaseModel):
    """One message of the conversation. Content may be a string or a list of content parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="An assistant's earlier function calls.")
    tool_call_id: str | None = Field(None, description="A `tool` message: the call it answers.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    def non_text_part(self) -> str | None:
        """The type of the first content part that is not text (e.g. `image_url`), or None."""
        if isinstance(self.content, list):
            return next((part.type for part in self.content if part.type != "text"), None)
        return None


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


# Larger integers cannot be forwarded (JSON encoders stop at 64 bits) and mean nothing as token counts.
MAX_INT = 2**63 - 1


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

    def token_limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def images(self) -> str | None:
        """The first non-text content part type in the conversation (refused by local text models)."""
        return next((kind for m in self.messages if (kind := m.non_text_part()) is not None), None)


class CompletionRequest(SamplingFields, ReasoningExtras):
    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1)
    prompt: str | list[str] = Field(..., description="Raw text; a list is accepted when it holds exactly one string.")
    echo: bool = False
    suffix: str | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def token_limit_param(self) -> str:
        return "max_tokens"

    def images(self) -> str | None:
        return None


# The gateway's own request fields: read here, never forwarded to an upstream.
GATEWAY_FIELDS = frozenset({"model", "reasoning_budget", "pal", "vote", "context"})


def sent_fields(request: ChatCompletionRequest | CompletionRequest, raw: Any = None) -> dict[str, Any]:
    """The request exactly as the client sent it, less `model` and the gateway's own extras: what an
    OpenAI-compatible upstream is sent. `raw` is the parsed JSON object the request was validated from (numbers,
    unknown fields and message parts untouched); without it the validated request stands in (no defaults)."""
    if not isinstance(raw, dict):
        raw = request.model_dump(exclude_unset=True)
    return {k: v for k, v in raw.items() if k not in GATEWAY_FIELDS}


def override_fields(fields: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """`fields` with sampling parameters replaced (a router asking for `n`/`temperature`); `max_tokens` keeps the
    client's spelling (`max_completion_tokens` stays that name)."""
    out = dict(fields)
    for key, value in overrides.items():
        if key == "max_tokens" and "max_completion_tokens" in out:
            key = "max_completion_tokens"
        out[key] = value
    return out


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, texts, or token ids (token ids only for an upstream embedding model).")
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
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_tools(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


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
    tool_calls: list[dict[str, Any]] | None = None  # fragments: index, then id/type/function name/arguments

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends `role` only in the first delta; later deltas carry just `content`.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


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
    logprobs: dict[str, Any] | None = None


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
    default_max_tokens: int | None = Field(None, description="Output cap used when a request sends no max_tokens.")
    max_output_tokens: int | None = Field(None, description="Largest max_tokens accepted (400 above it).")


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


# --------------------------------------------------------------------------- talking to an OpenAI-compatible upstream


class UpstreamShapeError(ValueError):
    """An upstream answered 200 with JSON that is not an OpenAI completion or chunk."""


def upstream_body(model: str, req: Any, stream: bool) -> dict[str, Any]:
    """The JSON body for an upstream: the client's fields exactly as sent (`req.sent`), or, for a request the
    gateway made itself, its sampling fields. `model` becomes the upstream's model name."""
    if req.sent is not None:
        body = dict(req.sent)
    else:
        body = {"max_tokens": req.max_tokens, "temperature": req.temperature, **req.extra}
        if req.n != 1:
            body["n"] = req.n
        if req.top_p != 1.0:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        if req.messages is not None:
            body["messages"] = req.messages
        else:
            body["prompt"] = req.prompt
    body["model"] = model
    if stream:
        body["stream"] = True
    else:  # a streaming client's request run whole (a routing plan, a reasoning strategy)
        body.pop("stream", None)
        body.pop("stream_options", None)
    return body


def completion_choices(data: Any, chat: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """An upstream completion → ([{text, content_null, finish_reason, tool_calls, logprobs}], usage)."""
    if not isinstance(data, dict) or not isinstance(choices := data.get("choices"), list):
        raise UpstreamShapeError("upstream returned a response that is not an OpenAI completion (no `choices` list)")
    out = []
    for c in choices:
        if not isinstance(c, dict):
            raise UpstreamShapeError("upstream returned a choice that is not an object")
        if chat:
            message = c.get("message")
            if not isinstance(message, dict):
                raise UpstreamShapeError("upstream returned a chat choice without a `message` object")
            content, tool_calls = message.get("content"), message.get("tool_calls")
        else:
            content, tool_calls = c.get("text"), None
        if content is not None and not isinstance(content, str):
            raise UpstreamShapeError("upstream returned content that is not a string")
        out.append({"text": content or "", "finish_reason": c.get("finish_reason") or "stop",
                    "tool_calls": tool_calls or None, "logprobs": c.get("logprobs")})
    usage = data.get("usage")
    return out, usage if isinstance(usage, dict) else {}


def chunk_choices(obj: Any, chat: bool) -> tuple[list[tuple], dict[str, Any] | None]:
    """One upstream stream chunk → ([(index, text, finish_reason, tool_calls, logprobs)], usage or None).
    Raises UpstreamShapeError for a chunk of the wrong shape, and for an in-band `error` (its message)."""
    if not isinstance(obj, dict):
        raise UpstreamShapeError("upstream sent a stream chunk that is not a JSON object")
    if "error" in obj:
        err = obj["error"]
        raise UpstreamShapeError(f"upstream error: {err.get('message', err) if isinstance(err, dict) else err}")
    choices, usage = obj.get("choices"), obj.get("usage")
    if not isinstance(choices, list) or (usage is not None and not isinstance(usage, dict)):
        raise UpstreamShapeError("upstream sent a stream chunk that is not an OpenAI chunk (no `choices` list)")
    out = []
    for c in choices:
        if not isinstance(c, dict):
            raise UpstreamShapeError("upstream sent a stream choice that is not an object")
        if chat:
            delta = c.get("delta")
            if not isinstance(delta, dict):
                raise UpstreamShapeError("upstream sent a stream choice without a `delta` object")
            text, tool_calls = delta.get("content"), delta.get("tool_calls")
        else:
            text, tool_calls = c.get("text"), None
        index = c.get("index", 0)
        if (text is not None and not isinstance(text, str)) or not isinstance(index, int):
            raise UpstreamShapeError("upstream sent a stream choice whose content or index has the wrong type")
        out.append((index, text or "", c.get("finish_reason"), tool_calls or None, c.get("logprobs")))
    return out, usage


def completion_logprobs(logprobs: dict[str, Any] | None, offset: int = 0) -> tuple[dict[str, Any] | None, int]:
    """A local backend's per-token entries (chat's `{"content": [...]}` shape) in a text completion's legacy shape
    (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob}, `text_offset` counted from `offset`), and the
    offset after its last token. An upstream's answer, already in that shape, is returned unchanged."""
    if not logprobs or "content" not in logprobs:
        return logprobs, offset
    entries = logprobs["content"]
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}, offset


def upstream_error_message(content: bytes) -> str:
    """The message of an upstream's error body (OpenAI shape), else its first 200 characters."""
    try:
        message = orjson.loads(content)["error"]["message"]
        if isinstance(message, str):
            return message
    except Exception:  # noqa: BLE001, S110 — any non-OpenAI error body is reported by its text
        pass
    return content[:200].decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------- function calling
@dataclass(frozen=True)
class FunctionSpec:
    """One entry of a request's `tools` (`{"type": "function", "function": {name, description, parameters}}`)."""

    name: str
    description: str
    parameters: dict[str, Any]


def function_tools(tools: Any) -> list[FunctionSpec]:
    """The request's `tools`, read (a malformed entry is a 400 naming it)."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                             "\"parameters\": {...}}}}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")  # noqa: TRY004
        out.append(FunctionSpec(fn["name"], str(fn.get("description") or ""), params))
    return out


def tool_choice_of(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    """`tool_choice` → (mode, forced function name): ("none"|"auto"|"required", None) or ("required", name)."""
    if tool_choice in (None, "auto"):
        return "auto", None
    if tool_choice in ("none", "required"):
        return tool_choice, None
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "  # noqa: TRY004
                         "{\"name\": ...}}")
    if name not in names:
        raise ValueError(f"tool_choice names function '{name}', which is not in tools ({', '.join(names)})")
    return "required", name


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One entry of an assistant message's `tool_calls` (a stream delta adds its `index`)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


# ---------------------------------------------------------------------------------------------- /v1/responses
class ResponsesRequest(ReasoningExtras):
    """OpenAI's Responses API request, served by translating it to one chat completion (`to_chat`)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1)
    input: str | list[dict[str, Any]] = Field(..., description="Text, or a list of messages and function-call items.")
    instructions: str | None = Field(None, description="A system message placed before the input.")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = Field(None, description="`{\"format\": {...}}`: text, json_object or json_schema.")

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion; a part this gateway cannot serve is a ValueError naming it."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions \
            else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            kind = item.get("type", "message")
            if kind == "message":
                content = item.get("content")
                if isinstance(content, list):
                    if any(p.get("type") not in ("input_text", "output_text", "text") for p in content):
                        raise ValueError(f"input[{i}]: only text content parts are served (input_text)")
                    content = "".join(str(p.get("text", "")) for p in content)
                messages.append({"role": item.get("role", "user"), "content": content})
            elif kind == "function_call":
                messages.append({"role": "assistant", "content": None, "tool_calls": [{
                    "id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                                 "content": str(item.get("output", ""))})
            else:
                raise ValueError(f"input[{i}]: item type {kind!r} is not served (message, function_call, "
                                 "function_call_output)")
        if not messages:
            raise ValueError("input: send at least one message")
        chat: dict[str, Any] = {"model": self.model, "messages": messages}
        for name in ("temperature", "top_p", "parallel_tool_calls", "reasoning_budget", "pal", "vote"):
            if (value := getattr(self, name)) is not None:
                chat[name] = value
        if self.max_output_tokens is not None:
            chat["max_completion_tokens"] = self.max_output_tokens
        if self.stream:  # a Responses stream ends with the usage, so the chat stream is asked for it
            chat.update(stream=True, stream_options={"include_usage": True})
        for i, tool in enumerate(self.tools or []):
            if tool.get("type") == "file_search":  # emulated: retrieve from our vector stores, then answer
                chat["context"] = {"vector_store_ids": tool.get("vector_store_ids"),
                                   **({"top_k": tool["max_num_results"]} if "max_num_results" in tool else {})}
            elif tool.get("type") == "function":
                chat.setdefault("tools", []).append({"type": "function", "function": {
                    k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}})
            else:
                raise ValueError(f"tools[{i}]: only function and file_search tools are served "
                                 f"(type {tool.get('type')!r})")
        if self.tool_choice is not None:
            choice = self.tool_choice
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}} \
                if isinstance(choice, dict) else choice
        fmt = (self.text or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
        elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
            chat["response_format"] = {"type": "json_object"}
        return ChatCompletionRequest.model_validate(chat)


def response_object(request: ResponsesRequest, rid: str, created: int, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None, status: str = "completed",
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Responses API `response` object."""
    u = usage or {}
    details = u.get("completion_tokens_details") or {}
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": request.model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
        "temperature": request.temperature, "top_p": request.top_p, "tools": request.tools or [],
        "tool_choice": request.tool_choice or "auto", "parallel_tool_calls": request.parallel_tool_calls is not False,
        "text": request.text or {"format": {"type": "text"}}, "metadata": {},
        "usage": None if usage is None else {
            "input_tokens": u.get("prompt_tokens", 0), "output_tokens": u.get("completion_tokens", 0),
            "total_tokens": u.get("total_tokens", 0), "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)}},
        **(extra or {}),
    }


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def function_call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.get("id"),
            "name": fn.get("name"), "arguments": fn.get("arguments", ""), "status": status}


def file_search_item(request: ResponsesRequest, citations: list[dict[str, Any]]) -> dict[str, Any]:
    items = [{"role": "user", "content": request.input}] if isinstance(request.input, str) else request.input
    query = next((str(i.get("content")) for i in reversed(items) if i.get("role") == "user"), "")
    return {"type": "file_search_call", "id": f"fs_{uuid.uuid4().hex}", "status": "completed", "queries": [query],
            "results": [{"file_id": c["file_id"], "filename": c["filename"], "score": c["score"], "text": c["text"],
                         "attributes": {}} for c in citations]}


def response_from_chat(request: ResponsesRequest, chat: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (JSON) → the Responses API object for the same answer."""
    choice = chat["choices"][0]
    message = choice.get("message") or {}
    citations = (choice.get("slm_fusion") or {}).get("citations")
    output = [file_search_item(request, citations)] if citations is not None else []
    output += [message_item(message["content"])] if message.get("content") else []
    output += [function_call_item(c) for c in message.get("tool_calls") or []]
    extra = {"slm_fusion": choice["slm_fusion"]} if "slm_fusion" in choice else None
    return response_object(request, f"resp_{chat['id'].split('-', 1)[-1]}", chat["created"], output,
                           chat.get("usage"), "incomplete" if choice.get("finish_reason") == "length" else "completed",
                           extra)


class ResponseEvents:
    """Chat completion chunks (parsed JSON) → the Responses API's streaming events, in order: created,
    in_progress, output_item.added / content_part.added / output_text.delta… for the text, the function calls, then
    the done events and completed (incomplete at the length cap, failed after an error frame)."""

    def __init__(self, request: ResponsesRequest) -> None:
        self.request = request
        self.rid, self.created, self.msg_id = f"resp_{uuid.uuid4().hex}", int(time.time()), f"msg_{uuid.uuid4().hex}"
        self.seq = 0
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self.failed = False
        self.searched: dict[str, Any] | None = None  # the file_search_call item, output 0, when sources were used

    def _event(self, kind: str, **data: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **data}

    def start(self) -> list[dict[str, Any]]:
        shell = response_object(self.request, self.rid, self.created, [], None, "in_progress")
        return [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if "error" in chunk:  # the chat stream's in-band error frame
            self.failed = True
            err = chunk["error"]
            return [self._event("error", code=err.get("code") or err.get("type"), message=err.get("message"),
                                param=err.get("param"))]
        out: list[dict[str, Any]] = []
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            citations = (choice.get("slm_fusion") or {}).get("citations")
            if citations is not None and self.searched is None:
                self.searched = file_search_item(self.request, citations)
                out += [self._event("response.output_item.added", output_index=0,
                                    item={**self.searched, "status": "in_progress", "results": None}),
                        self._event("response.file_search_call.completed", item_id=self.searched["id"],
                                    output_index=0),
                        self._event("response.output_item.done", output_index=0, item=self.searched)]
            at = 1 if self.searched is not None else 0
            if delta.get("content"):
                if not self.text:
                    out.append(self._event("response.output_item.added", output_index=at,
                                           item=message_item("", "in_progress", self.msg_id)))
                    out.append(self._event("response.content_part.added", item_id=self.msg_id, output_index=at,
                                           content_index=0, part={"type": "output_text", "text": "",
                                                                  "annotations": []}))
                self.text.append(delta["content"])
                out.append(self._event("response.output_text.delta", item_id=self.msg_id, output_index=at,
                                       content_index=0, delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                have = self.calls.setdefault(call.get("index", 0), {"id": None, "function": {"name": None,
                                                                                             "arguments": ""}})
                have["id"] = call.get("id") or have["id"]
                have["function"]["name"] = fn.get("name") or have["function"]["name"]
                have["function"]["arguments"] += fn.get("arguments") or ""
            self.finish = choice.get("finish_reason") or self.finish
        return out

    def finish_events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        output: list[dict[str, Any]] = [self.searched] if self.searched is not None else []
        if self.text:
            full, at = "".join(self.text), len(output)
            item = message_item(full, item_id=self.msg_id)
            out += [self._event("response.output_text.done", item_id=self.msg_id, output_index=at, content_index=0,
                                text=full, logprobs=[]),
                    self._event("response.content_part.done", item_id=self.msg_id, output_index=at,
                                content_index=0, part=item["content"][0]),
                    self._event("response.output_item.done", output_index=at, item=item)]
            output.append(item)
        for _, call in sorted(self.calls.items()):
            item, index = function_call_item(call), len(output)
            out += [self._event("response.output_item.added", output_index=index,
                                item={**item, "arguments": "", "status": "in_progress"}),
                    self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=item["arguments"]),
                    self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
            output.append(item)
        status = "failed" if self.failed else "incomplete" if self.finish == "length" else "completed"
        final = response_object(self.request, self.rid, self.created, output, self.usage, status)
        return [*out, self._event(f"response.{status}", response=final)]


# ---------------------------------------------------------------------------------------------- files, vector stores
def details_chunk(cid: str, created: int, model: str, details: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A chat stream chunk with no text that carries the gateway's own results per choice index, as `slm_fusion`
    beside the delta (the JSON answer's `choices[i].slm_fusion`): the sources used (`citations`, before the text),
    the reasoning layer's program, votes and reasoning/answer token split (just before the choice's one chunk)."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": i, "delta": {}, "finish_reason": None, "slm_fusion": d} for i, d in details.items()]}


def file_object(f: dict[str, Any]) -> dict[str, Any]:
    return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": f["created_at"],
            "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None}


def file_counts(counts: dict[str, int]) -> dict[str, int]:
    """`file_counts` of a vector store or a file batch, from {status: files}."""
    return {k: counts.get(k, 0) for k in ("in_progress", "completed", "failed", "cancelled")} | \
        {"total": sum(counts.values())}


def vector_store_object(s: dict[str, Any]) -> dict[str, Any]:
    counts = s["file_counts"]
    return {"id": s["id"], "object": "vector_store", "created_at": s["created_at"], "name": s["name"],
            "usage_bytes": s["usage_bytes"], "status": "in_progress" if counts.get("in_progress") else "completed",
            "file_counts": file_counts(counts),
            "metadata": s["metadata"], "last_active_at": s["created_at"], "expires_after": None, "expires_at": None}


def vector_store_file_object(f: dict[str, Any]) -> dict[str, Any]:
    return {"id": f["file_id"], "object": "vector_store.file", "created_at": f["created_at"],
            "vector_store_id": f["store_id"], "status": f["status"], "usage_bytes": f["usage_bytes"],
            "last_error": None if f["last_error"] is None else {"code": "server_error", "message": f["last_error"]},
            "attributes": f["attributes"], "chunking_strategy": f["chunking"]}


def file_batch_object(b: dict[str, Any]) -> dict[str, Any]:
    """A `vector_store.files_batch`: in_progress until none of its files is, cancelled once cancelled."""
    counts = file_counts(b["file_counts"])
    status = b["status"] if b["status"] == "cancelled" or counts["in_progress"] else \
        "failed" if counts["failed"] == counts["total"] else "completed"
    return {"id": b["id"], "object": "vector_store.files_batch", "created_at": b["created_at"],
            "vector_store_id": b["store_id"], "status": status, "file_counts": counts}


def list_object(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}


def deleted_object(oid: str, kind: str) -> dict[str, Any]:
    return {"id": oid, "object": kind, "deleted": True}


def search_page(query: str, hits: list[Any]) -> dict[str, Any]:
    return {"object": "vector_store.search_results.page", "search_query": [query], "has_more": False,
            "next_page": None, "data": [{"file_id": h.file_id, "filename": h.filename, "score": h.score,
                                         "attributes": h.attributes, "content": [{"type": "text", "text": h.text}]}
                                        for h in hits]}


class VectorStoreCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    file_ids: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] | None = None
    chunking_strategy: dict[str, Any] | None = None
    expires_after: dict[str, Any] | None = None


class VectorStoreFileCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file_id: str
    attributes: dict[str, str | float | bool] | None = None
    chunking_strategy: dict[str, Any] | None = None


class FileBatchEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file_id: str
    attributes: dict[str, str | float | bool] | None = None
    chunking_strategy: dict[str, Any] | None = None


class FileBatchCreate(BaseModel):
    """`POST /v1/vector_stores/{id}/file_batches`: `file_ids` with one `attributes` / `chunking_strategy` for all,
    or `files`, each with its own."""

    model_config = ConfigDict(extra="forbid")
    file_ids: list[str] | None = None
    files: list[FileBatchEntry] | None = None
    attributes: dict[str, str | float | bool] | None = None
    chunking_strategy: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _ids_or_files(self) -> FileBatchCreate:
        if (self.file_ids is None) == (self.files is None):
            raise ValueError("give either file_ids or files (each {file_id, attributes?, chunking_strategy?})")
        if self.files is not None and (self.attributes is not None or self.chunking_strategy is not None):
            raise ValueError("with files, give attributes and chunking_strategy per file, not for the batch")
        return self

    def entries(self) -> list[tuple[str, Any, Any]]:
        if self.files is not None:
            return [(f.file_id, f.attributes, f.chunking_strategy) for f in self.files]
        return [(fid, self.attributes, self.chunking_strategy) for fid in self.file_ids or []]


class RankingOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)


class VectorStoreSearch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str | list[str]
    filters: dict[str, Any] | None = None
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False

    def text(self) -> str:
        return self.query if isinstance(self.query, str) else " ".join(self.query)
