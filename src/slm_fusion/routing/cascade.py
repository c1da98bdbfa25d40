"""`cascade` router: answer with the small specialist first, escalate to the next model when it is not confident.

Confidence signals (any one escalates, each can be switched off with `escalate_on`):
  agreement   self-consistency: `samples` completions vote on the extracted answer; agreement < `threshold`
  exec_error  a PAL completion whose program fails in the sandbox (syntax, runtime, timeout, ...)
  no_answer   no answer could be extracted (e.g. the budget ran out before "The answer is ...")
  classifier  a classifier router's probability for the small model < `min_probability` (checked before
              generating, so a prompt the classifier sends elsewhere never costs a small-model call)
When the reasoning layer has already computed them, a `Generation` carries `agreement`, `exec_error`,
`forced_without_answer`; otherwise they are computed here from the completion text with `reasonlite`.

```yaml
routers:
  math-cascade:
    type: cascade
    models: [smol-pal, big]       # tried in order; the last one answers whatever it says
    threshold: 0.6
    samples: 3
    temperature: 0.7
```
The decision records the path: `x-slm-fusion-route: math-cascade;path=smol-pal>big;...;reason=agreement 0.33<0.6`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slm_fusion.routing.base import (
    CallModel,
    ExecutionPlan,
    RouterBase,
    RouterContext,
    RoutingConfigError,
    RoutingRequest,
    register,
)

Signal = Literal["agreement", "exec_error", "no_answer", "classifier"]


@dataclass
class Assessment:
    """What the completions of one model say about its confidence."""

    answers: list[str | None]
    answer: str | None  # the majority answer
    agreement: float  # share of completions voting for it (1.0 for a single completion with an answer)
    winner: int | None  # index of a completion giving the majority answer
    exec_errors: list[str | None] = field(default_factory=list)
    no_answer: bool = False
    votes: dict[str, int] = field(default_factory=dict)

    @property
    def exec_error(self) -> str | None:
        return next((e for e in self.exec_errors if e), None) if all(self.exec_errors) else None


def _answer_of(text: str) -> tuple[str | None, str | None]:
    """(answer, exec error) for one completion: a PAL program is executed, anything else is read."""
    from reasonlite.answers import extract_answer, normalize_answer

    if "def solution" in text:
        from reasonlite.formats import extract_program
        from reasonlite.sandbox import execute

        result = execute(extract_program(text))
        if not result.ok:
            return None, result.error or "runtime"
        return normalize_answer(result.value if isinstance(result.value, str) else str(result.value)), None
    return extract_answer(text), None


def assess_sync(gens: list[Any]) -> Assessment:
    """Confidence of one model's completions (blocking: may run programs in the sandbox)."""
    from reasonlite.vote import majority_vote

    answers: list[str | None] = []
    errors: list[str | None] = []
    for g in gens:
        layer = getattr(g, "reasoning", None)
        if layer is not None:  # the reasoning layer already executed / read this answer: no second run
            answer, error = layer.get("answer"), getattr(g, "exec_error", None)
        else:
            answer, error = _answer_of(g.text)
            error = getattr(g, "exec_error", None) or error
        answers.append(answer)
        errors.append(error)
    vote = majority_vote(answers)
    agreement = vote.agreement
    reported = [a for a in (getattr(g, "agreement", None) for g in gens) if a is not None]
    if reported:  # the reasoning layer voted over samples we do not see: trust its number
        agreement = min(reported)
    winner = None
    if vote.answer is not None:
        from reasonlite.answers import normalize_answer

        winner = next(i for i, a in enumerate(answers) if a is not None and normalize_answer(a) == vote.answer)
    forced = any(getattr(g, "forced_without_answer", False) for g in gens)
    return Assessment(answers=answers, answer=vote.answer, agreement=agreement, winner=winner, exec_errors=errors,
                      no_answer=vote.answer is None or forced, votes=dict(vote.counts))


async def assess(gens: list[Any]) -> Assessment:
    return await asyncio.to_thread(assess_sync, gens)


def low_confidence(a: Assessment, threshold: float, signals: set[str]) -> str | None:
    """Why the completions should be escalated, or None when they are good enough."""
    if "exec_error" in signals and a.exec_error:
        return f"exec_error {a.exec_error}"
    if "no_answer" in signals and a.no_answer:
        return "no answer"
    if "agreement" in signals and a.agreement < threshold:
        return f"agreement {a.agreement:.2f}<{threshold}"
    return None


@register("cascade")
class CascadeRouter(RouterBase):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        models: list[str] = Field(..., min_length=2, description="Tried in order, cheapest first.")
        threshold: float = Field(0.6, ge=0.0, le=1.0, description="Escalate when self-consistency agreement is lower.")
        samples: int = Field(3, ge=1, le=32, description="Completions per non-final model for the agreement vote.")
        temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature when samples > 1.")
        escalate_on: list[Signal] = Field(default=["agreement", "exec_error", "no_answer", "classifier"])
        classifier: str | None = Field(None, description="Name of a `classifier` router consulted before generating.")
        min_probability: float = Field(0.5, ge=0.0, le=1.0, description="Classifier p(model) below this skips it.")

    def setup(self, ctx: RouterContext) -> None:
        self.signals = set(self.cfg.escalate_on)
        self.classifier = None
        if self.cfg.classifier:
            router = ctx.routers.get(self.cfg.classifier)
            if router is None or getattr(router, "kind", "") != "classifier":
                raise RoutingConfigError(
                    f"{self.where}.classifier: '{self.cfg.classifier}' is not a classifier router defined "
                    "earlier in `routers:`; define it first"
                )
            self.classifier = router

    def targets(self) -> set[str]:
        return set(self.cfg.models)

    async def route(self, request: RoutingRequest) -> ExecutionPlan:
        models = list(self.cfg.models)
        skipped: list[str] = []
        probs: dict[str, float] = {}
        if self.classifier is not None and "classifier" in self.signals:
            probs = await asyncio.to_thread(self.classifier.model_probabilities, request.text)  # embeds: off the loop
            while len(models) > 1 and probs.get(models[0], 0.0) < self.cfg.min_probability:
                skipped.append(f"p({models[0]})={probs.get(models[0], 0.0):.2f}<{self.cfg.min_probability}")
                models.pop(0)
        plan = ExecutionPlan(model=models[0], score=probs.get(models[0], 1.0), reason="; ".join(skipped) or "first",
                             router=self.name, path=[], runner=self._run)
        plan.extra["_candidates"] = models
        return plan

    async def _run(self, plan: ExecutionPlan, call: CallModel) -> list[Any]:
        models: list[str] = plan.extra.pop("_candidates")
        reasons: list[str] = [plan.reason] if plan.reason != "first" else []
        for i, model in enumerate(models):
            plan.path.append(model)
            plan.model = model
            last = i == len(models) - 1
            if last:
                gens = await call(model)
                plan.reason = ", ".join(reasons) or "final model"
                plan.score = 1.0 if not reasons else plan.score
                return gens
            n = self.cfg.samples if "agreement" in self.signals else 1
            gens = await call(model, n=n, temperature=self.cfg.temperature if n > 1 else 0.0)
            a = await assess(gens)
            plan.score = a.agreement
            why = low_confidence(a, self.cfg.threshold, self.signals)
            if why is None:
                plan.reason = ", ".join(reasons + [f"confident: agreement {a.agreement:.2f}"])
                plan.extra["slm_fusion"] = {"agreement": a.agreement, "votes": a.votes, "answer": a.answer}
                best = gens[a.winner if a.winner is not None else 0]
                return [best]
            reasons.append(why)
        raise AssertionError("unreachable: the last model always answers")
