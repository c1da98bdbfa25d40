"""Virtual models: names clients send as `model` that a router (or output fusion) resolves per request.

```yaml
routers:
  topic: {type: semantic, default: general, exemplars_file: examples/routing_labelled.jsonl}
virtual_models:
  auto: {router: topic}                                      # a router defined in `routers:`
  by-length: {router: rules, default: smol, rules: [...]}    # or a router type with its config inline
  ensemble: {fusion: vote, models: [smol, smol-gguf, big]}   # output fusion: short for {router: fusion, fusion: vote, ...}
```
An explicit real model name never goes through a router. The sections are typed (`routing.specs`) and validated
when the config loads; building checks what needs files (exemplars, classifier labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slm_fusion.routing.base import (
    ExecutionPlan,
    RouteDecision,
    RouterBase,
    RouterContext,
    RoutingRequest,
    build_router,
)
from slm_fusion.routing.specs import RouterRef


class VirtualModel:
    """A name clients send as `model`, and the router that resolves it: a `Router` itself (`await route(request)`),
    so the gateway treats every virtual model alike."""

    def __init__(self, name: str, router: RouterBase) -> None:
        self.name = name
        self.router = router
        self.kind = router.kind

    def targets(self) -> set[str]:
        return self.router.targets()

    async def route(self, request: RoutingRequest) -> RouteDecision | ExecutionPlan:
        request.model = self.name
        return await self.router.route(request)


def build_virtual_models(
    routers: dict[str, Any], virtual_models: dict[str, Any], models: set[str],
    base_dir: Path | None = None, load_models: bool = True,
) -> dict[str, VirtualModel]:
    """Build every router and virtual model from the validated sections (`routing.specs`: `RouterSpec` and
    `VirtualModelSpec` values); RoutingConfigError names the bad entry and the fix.

    `load_models=False` checks everything (models, files, labels, embedding ids) without loading embedding models.
    """

    ctx = RouterContext(models=set(models), base_dir=base_dir or Path.cwd(), load_models=load_models)
    for name, spec in routers.items():
        ctx.routers[name] = build_router(name, spec, ctx)
    out: dict[str, VirtualModel] = {}
    for name, spec in virtual_models.items():
        # `{router: NAME}` shares the router built above; a router written inline is built for this name.
        router = ctx.routers[spec.router] if isinstance(spec, RouterRef) \
            else build_router(name, spec, ctx, where=f"virtual_models.{name}")
        out[name] = VirtualModel(name, router)
    return out
