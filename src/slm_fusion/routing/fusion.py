"""`fusion` router (output fusion): ask several specialists at once and fuse their answers.

```yaml
virtual_models:
  ensemble: {fusion: vote, models: [smol-pal, smol-cot, gemma]}   # short form: `fusion:` names the method
routers:                                                           # or like any router, by its registered type
  ensemble: {type: fusion, fusion: first_valid, models: [smol-pal, gemma]}
```
  vote         majority vote over the extracted answers (a PAL completion's program is executed first); the winning
               completion is returned, the agreement is the confidence
  first_valid  the first model in `models` order whose completion has an answer (program runs, answer extractable)
The response carries `slm_fusion: {agreement, votes, answers, models}` and the header `x-slm-fusion-agreement`.
A specialist that fails (error, timeout) is left out of the vote; the request fails only when all of them do.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slm_fusion.routing.base import CallModel, ExecutionPlan, RouterBase, RouterContext, RoutingRequest, register
from slm_fusion.routing.cascade import assess_sync


@register("fusion")
class OutputFusion(RouterBase):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        fusion: Literal["vote", "first_valid"] = Field("vote", description="How the specialists' answers are fused.")
        models: list[str] = Field(..., min_length=2, description="Specialists asked concurrently.")

    def setup(self, ctx: RouterContext) -> None:
        pass

    def targets(self) -> set[str]:
        return set(self.cfg.models)

    async def route(self, request: RoutingRequest) -> ExecutionPlan:
        return ExecutionPlan(model=self.cfg.models[0], score=0.0, reason=self.cfg.fusion, router=self.name,
                             path=list(self.cfg.models), runner=self._run)

    async def _run(self, plan: ExecutionPlan, call: CallModel) -> list[Any]:
        models = self.cfg.models
        results = await asyncio.gather(*(call(m, n=1) for m in models), return_exceptions=True)
        ok = [(m, r[0]) for m, r in zip(models, results, strict=True) if not isinstance(r, BaseException) and r]
        failed = {m: f"{type(r).__name__}: {r}"[:200] for m, r in zip(models, results, strict=True)
                  if isinstance(r, BaseException)}
        if not ok:
            raise next(r for r in results if isinstance(r, BaseException))
        assessment = await asyncio.to_thread(assess_sync, [g for _, g in ok])
        answers = {m: a for (m, _), a in zip(ok, assessment.answers, strict=True)}
        if self.cfg.fusion == "first_valid":
            index = next((i for i, a in enumerate(assessment.answers) if a is not None), 0)
            chosen = ok[index][0]
            agreement = sum(1 for a in answers.values() if a is not None and a == answers[chosen]) / len(models)
        else:
            index = assessment.winner if assessment.winner is not None else 0
            chosen = ok[index][0]
            # Agreement over ALL specialists asked: a failed one counts as a vote against.
            agreement = assessment.agreement * len(ok) / len(models)
        plan.model = chosen
        plan.score = agreement
        plan.reason = f"{self.cfg.fusion}: {chosen} won, agreement {agreement:.2f}"
        plan.extra["slm_fusion"] = {
            "fusion": self.cfg.fusion, "agreement": agreement, "votes": assessment.votes, "answers": answers,
            "chosen": chosen, "failed": failed,
        }
        plan.headers["x-slm-fusion-agreement"] = f"{agreement:.3f}"
        return [ok[index][1]]
