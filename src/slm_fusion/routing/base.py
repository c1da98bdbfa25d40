"""The router protocol: `async route(RoutingRequest) -> RouteDecision | ExecutionPlan`, and the registry mapping
config names to classes.

A router is one method (as in RouteLLM), always a coroutine, so every caller (the gateway, a cascade, `route-eval`)
awaits it the same way. A router whose decision computes (an embedding) runs that part off the event loop itself,
with `asyncio.to_thread` inside its own `route`; a router that only matches text (rules) returns without ever
suspending. It sees plain Python — the conversation, the last user turn, request headers, `user` — never OpenAI's
JSON: `routing_request(body, headers)` is the one place that translates.
Each router class declares a pydantic `Config` (unknown keys rejected; `register` tags it with `type`, and
`routing.specs` makes the union of them the type of a `routers:` entry, validated when the YAML loads) and
`targets()`, the model names it can choose, checked when the routers are built (`slm-fusion check` builds them), so a
config that names a missing model fails before serving, not at request time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, create_model

from reasonlite.jsonl import JsonlError, iter_jsonl


class RoutingConfigError(ValueError):
    """A `routers:` / `virtual_models:` / `routing:` entry that cannot work; the message names the field and the fix."""


@dataclass
class RoutingRequest:
    """What a router may look at, in plain Python."""

    messages: list[dict[str, str]]  # [{"role", "content"}]; a raw completion prompt is one user message
    text: str  # the last user turn (the prompt for /v1/completions)
    model: str = ""  # the (virtual) model name the client asked for
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    user: str | None = None

    @property
    def n_messages(self) -> int:
        return len(self.messages)

    @property
    def prompt_chars(self) -> int:
        return sum(len(m.get("content") or "") for m in self.messages)


def routing_request(body: Any, headers: Mapping[str, str] | None = None) -> RoutingRequest:
    """Build a `RoutingRequest` from a wire request (`ChatCompletionRequest` / `CompletionRequest`) or a string."""
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    if isinstance(body, str):
        return RoutingRequest(messages=[{"role": "user", "content": body}], text=body, headers=hdrs)
    if getattr(body, "messages", None) is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
    else:
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        messages, text = [{"role": "user", "content": prompt}], prompt
    return RoutingRequest(messages=messages, text=text, model=getattr(body, "model", ""), headers=hdrs,
                          user=getattr(body, "user", None))


@dataclass
class RouteDecision:
    """The chosen model, how sure the router is (`score`, router-specific in [0, 1]) and why."""

    model: str
    score: float
    reason: str
    router: str
    path: list[str] = field(default_factory=list)  # models tried in order (cascade, fallbacks)
    label: str | None = None  # the class the router recognised (exemplar / classifier label) before `labels:` mapping

    def header(self) -> str:
        """`x-slm-fusion-route` value: `router;path=a>b;score=0.83;reason=...` (ASCII, one line, bounded)."""
        parts = [self.router]
        if len(self.path) > 1:
            parts.append("path=" + ">".join(self.path))
        parts.append(f"score={self.score:.3f}")
        parts.append("reason=" + self.reason.replace(";", ",").replace("\n", " "))
        return ";".join(parts)[:300].encode("ascii", "replace").decode()


class Router(Protocol):
    name: str
    kind: str

    async def route(self, request: RoutingRequest) -> RouteDecision | ExecutionPlan:
        """The decision for one request; its `model` is always a configured model name."""

    def targets(self) -> set[str]:
        """Every model this router may choose (checked against the configured models at load time)."""


@dataclass
class RouterContext:
    """What a router needs at build time besides its own config."""

    models: set[str]  # configured (real) model names
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths in the config resolve against this
    routers: dict[str, Router] = field(default_factory=dict)  # routers built so far (a cascade may use one)
    load_models: bool = True  # False (`slm-fusion check`): validate everything but do not load embedding models

    def path(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def check_model(self, name: str, where: str) -> str:
        if name not in self.models:
            raise RoutingConfigError(
                f"{where}: model '{name}' is not configured; use one of {sorted(self.models)} or add it to `models:`"
            )
        return name


class RouterBase:
    """Shared plumbing: keep the validated `Config` (validated with the whole config file, see
    `routing.specs`), then `setup()` and check the models it can choose."""

    kind: ClassVar[str] = ""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, name: str, cfg: BaseModel, ctx: RouterContext, where: str = "") -> None:
        self.where = where or f"routers.{name}"  # the entry's path in the YAML, for error messages
        if not isinstance(cfg, self.Config):
            raise TypeError(f"{self.where}: a {self.kind} router needs its {self.Config.__name__}, "
                            f"got {type(cfg).__name__}")
        self.name = name
        self.cfg: Any = cfg
        self.setup(ctx)
        for model in self.targets():
            ctx.check_model(model, self.where)

    def setup(self, ctx: RouterContext) -> None:
        """Load what the router needs (exemplars, a trained classifier) and check it; raise RoutingConfigError."""

    def targets(self) -> set[str]:
        raise NotImplementedError

    async def route(self, request: RoutingRequest) -> RouteDecision | ExecutionPlan:
        raise NotImplementedError

    def decide(self, model: str, score: float, reason: str, label: str | None = None) -> RouteDecision:
        return RouteDecision(model=model, score=float(score), reason=reason, router=self.name, path=[model],
                             label=label)


ROUTERS: dict[str, type[RouterBase]] = {}


def register(kind: str) -> Callable[[type[RouterBase]], type[RouterBase]]:
    """Class decorator: `@register("rules")` makes `type: rules` usable in the config.

    The class's `Config` gains `type: Literal["rules"]`, the tag of the discriminated union `routing.specs` builds
    over every registered `Config`, so a `routers:` entry is validated as its own class when the YAML loads.
    """

    def wrap(cls: type[RouterBase]) -> type[RouterBase]:
        cls.kind = kind
        tagged = create_model(
            f"{cls.__name__}Config", __base__=cls.Config, __module__=cls.__module__,
            type=(Literal[kind], Field(description=f"`{kind}`: the router class this entry configures.")))
        tagged.__qualname__ = f"{cls.__qualname__}.Config"  # where pickle (Ray, processes) finds it
        cls.Config = tagged  # type: ignore[misc]
        ROUTERS[kind] = cls
        return cls

    return wrap


def build_router(name: str, spec: BaseModel, ctx: RouterContext, where: str = "") -> RouterBase:
    """`spec` is one validated router `Config` (an entry of `routers:`, or written inline at `where`); its `type`
    picks the class."""
    return ROUTERS[spec.type](name, spec, ctx, where)  # type: ignore[attr-defined]


@dataclass
class LabelledPrompt:
    """One row of a labelled routing file: the prompt, the model that should serve it, and optionally a gold answer."""

    prompt: str
    model: str
    answer: str | None = None


def load_labelled(path: str | Path) -> list[LabelledPrompt]:
    """Read a JSONL of `{"prompt": ..., "model": ..., "answer"?: ...}` rows (`text`/`question` accepted for prompt)."""

    path = Path(path)
    if not path.exists():
        raise RoutingConfigError(f"{path}: labelled prompt file not found")
    rows: list[LabelledPrompt] = []
    for lineno, obj in iter_jsonl(path, errors="yield"):
        if isinstance(obj, JsonlError):
            raise RoutingConfigError(str(obj))
        if not isinstance(obj, dict):
            raise RoutingConfigError(f"{path}:{lineno}: each row must be a JSON object with `prompt` and `model`")
        prompt = obj.get("prompt") or obj.get("text") or obj.get("question")
        model = obj.get("model") or obj.get("label")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(model, str) or not model:
            raise RoutingConfigError(f"{path}:{lineno}: each row needs a non-empty `prompt` and `model`")
        answer = obj.get("answer")
        rows.append(LabelledPrompt(prompt, model, None if answer is None else str(answer)))
    if not rows:
        raise RoutingConfigError(f"{path}: no rows; a labelled file needs `prompt`/`model` JSON lines")
    return rows


# A gateway function that runs one generation on a configured model: `await call(model, n=..., temperature=...)`
# returns its `Generation`s. Cascades and output fusion are written against it, so they run the same way inside the
# gateway (queues, timeouts, fallbacks, metrics) and in `route-eval` / tests.
CallModel = Callable[..., Awaitable[list[Any]]]


@dataclass
class ExecutionPlan(RouteDecision):
    """A decision that runs generations itself (cascade, output fusion) instead of naming one model.

    `execute(call)` returns the generations to send back and updates `model`, `path`, `score`, `reason` with what
    happened; `extra` holds fields added to the response body (e.g. `slm_fusion: {agreement, votes}`) and `headers`
    extra response headers.
    """

    runner: Callable[[ExecutionPlan, CallModel], Awaitable[list[Any]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    async def execute(self, call: CallModel) -> list[Any]:
        assert self.runner is not None
        return await self.runner(self, call)
