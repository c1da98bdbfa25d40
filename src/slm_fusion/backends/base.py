"""The backend protocol in plain Python types, and the registry mapping config `backend:` names to classes.

A backend turns a `GenerationRequest` into text. It knows nothing about HTTP or OpenAI's JSON (that is
`slm_fusion.protocol`), queues or auth (that is `slm_fusion.app`).

Two ways to ask for text:
- chat: `GenerationRequest(messages=[...])` — the backend applies the model's chat template;
- raw continuation: `GenerationRequest(prompt="...")` — the text is used verbatim, nothing is added. The reasoning
  layer uses this for budget forcing: `backend.format_chat(messages)` + the assistant's partial text, continued.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from slm_fusion.config import ModelBase

if TYPE_CHECKING:
    from slm_fusion.tools import ToolPlan


@dataclass
class ReasoningOptions:
    """What one request asks of the reasoning layer (the SDK's `extra_body`); None leaves the model's `reasoning:`
    default. Filled from the wire body by the gateway, so nothing below serving reads the body itself."""

    reasoning_budget: int | None = None
    pal: bool | None = None
    vote: bool | None = None
    temperature_set: bool = False  # the client chose a temperature (else a vote samples at `vote_temperature`)

    def asked(self) -> bool:
        return self.reasoning_budget is not None or bool(self.pal) or bool(self.vote)


@dataclass
class GenerationRequest:
    messages: list[dict[str, Any]] | None = None  # [{"role": ..., "content": str}]
    prompt: str | None = None  # already formatted text to continue verbatim
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown request fields (local backends read a few)
    # The client's request exactly as sent (no defaults filled in, unknown fields kept, messages with their
    # `name`/`tool_calls`/`tool_call_id`/image parts): an OpenAI-compatible upstream is sent this, not the fields
    # above. None for requests the gateway makes itself (the reasoning layer's continuations).
    sent: dict[str, Any] | None = None
    reasoning: ReasoningOptions = field(default_factory=ReasoningOptions)
    tools: ToolPlan | None = None  # function calling on a local model (slm_fusion.tools): the reply becomes tool_calls
    adapter: str | None = None  # a LoRA adapter folder applied on the backend's base weights (multi-LoRA); None = base
    # The sources retrieval packed into `messages` (slm_fusion.context; objects with filename and text): a student
    # prompt the reasoning layer rebuilds keeps them, as `reasonlite.formats.build_messages(..., sources=)`.
    sources: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of `messages` (chat) or `prompt` (raw text)")


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    # Set by the reasoning layer (slm_fusion.reasoning) only; the cascade router reads the last three.
    reasoning: dict[str, Any] | None = None  # answer, status, program, votes, reasoning/answer tokens ...
    agreement: float | None = None  # self-consistency agreement ratio
    exec_error: str | None = None  # the PAL program failed in the sandbox
    forced_without_answer: bool = False  # budget forcing still produced no answer
    # Returned unchanged from OpenAI-compatible upstreams.
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: dict[str, Any] | None = None


@dataclass
class TokenChunk:
    """A piece of streamed text for choice `index`; the last chunk of a choice carries its `finish_reason`.

    A backend that knows the exact token counts sends them once at the end as `usage=(prompt, completion)` totals
    for the whole request (all choices); the gateway counts chunks otherwise.
    """

    index: int
    text: str
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # streamed function-call fragments, passed on as received
    logprobs: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None  # the reasoning layer's results for this choice (`Generation.reasoning`)
    reasoning_tokens: int | None = None  # with `usage`, when the reasoning layer made the answer (the ledger's)


@runtime_checkable
class Backend(Protocol):
    config: ModelBase

    async def start(self) -> None:
        """Load weights / open connection pools (called once, in the app's lifespan)."""

    async def generate(self, req: GenerationRequest) -> list[Generation]:
        """All `req.n` choices, complete."""

    def stream(self, req: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Text as it is produced; closing the iterator early cancels the work."""

    def count_tokens(self, text: str) -> int: ...

    def format_chat(self, messages: list[dict[str, Any]]) -> str:
        """The model's chat template applied with the generation prompt (raise NotImplementedError if unknown)."""

    async def aclose(self) -> None: ...


async def collect(chunks: AsyncIterator[TokenChunk], n: int, logprobs: bool = False) -> list[Generation]:
    """A local backend's `generate`: its stream gathered into `n` complete choices. The stream reports the
    request's completion tokens as one total; it is spread so the per-choice numbers add up exactly."""
    texts, reasons = [""] * n, ["stop"] * n
    entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    usage = (0, 0)
    async for chunk in chunks:
        texts[chunk.index] += chunk.text
        if chunk.logprobs:
            entries[chunk.index] += chunk.logprobs["content"]
        if chunk.finish_reason:
            reasons[chunk.index] = chunk.finish_reason
        if chunk.usage:
            usage = chunk.usage
    share, rest = divmod(usage[1], n)
    return [Generation(text=t, finish_reason=r, prompt_tokens=usage[0], completion_tokens=share + (i < rest),
                       logprobs={"content": lp} if logprobs else None)
            for i, (t, r, lp) in enumerate(zip(texts, reasons, entries, strict=True))]


def find_stop(text: str, start: int, stops: list[str]) -> int | None:
    """Where the earliest stop sequence begins in `text`, searching from `start` (text before it was already
    streamed, and a match cannot begin there: the streamed part always ends `hold_back(stops)` characters early)."""
    hits = [k for k in (text.find(s, start) for s in stops) if k >= 0]
    return min(hits) if hits else None


def hold_back(stops: list[str]) -> int:
    """Characters a local backend keeps unstreamed: a tail that could be the start of a stop sequence is never
    streamed and then retracted."""
    return max((len(s) for s in stops), default=1) - 1


BACKENDS: dict[str, str] = {
    # Imported lazily: the transformers backend pulls torch, llamacpp pulls llama_cpp.
    "transformers": "slm_fusion.backends.transformers:TransformersBackend",
    "llamacpp": "slm_fusion.backends.llamacpp:LlamaCppBackend",
    "openai": "slm_fusion.backends.openai_upstream:OpenAIBackend",
}


def backend_class(name: str) -> type:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend '{name}'; choose one of {sorted(BACKENDS)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_backend(config: ModelBase, shared: dict[Any, Any] | None = None) -> Backend:
    """A backend for one model config. `shared` (one dict per gateway) lets models that are LoRA adapters on the
    same base share one engine, i.e. one copy of the base weights (backends/adapters.py)."""
    if getattr(config, "adapter", None) and shared is not None:
        from slm_fusion.backends.adapters import adapter_backend

        return adapter_backend(config, shared)
    return backend_class(config.backend)(config)  # type: ignore[attr-defined]


class ThreadBridge:
    """Deliver items from a worker thread into an asyncio.Queue owned by an event loop."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed: the client is gone, nothing to deliver to
            pass


def requested_logprobs(req: GenerationRequest) -> int | None:
    """None unless logprobs are asked; then how many alternatives per token: chat's `logprobs: true` with
    `top_logprobs`, or a text completion's `logprobs: <int>`."""
    asked = req.extra.get("logprobs")
    if asked is True:
        return int(req.extra.get("top_logprobs") or 0)
    if isinstance(asked, int) and not isinstance(asked, bool):
        return asked
    return None

