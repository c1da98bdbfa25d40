"""Virtual models: names clients send as `model` that a router (or output fusion) resolves per request.

```yaml
routers:
  topic: {type: semantic, default: general, exemplars_file: examples/routing_labelled.jsonl}
virtual_models:
  auto: {router: topic}                                      # a router defined in `routers:`
  by-length: {router: rules, default: smol, rules: [...]}    # or a router type with its config inline
  ensemble: {fusion: vote, models: [smol, smol-gguf, big]}   # output fusion: short for {router: fusion, fusion: vote, ...}
```
An explicit real model name never goes through a router. Everything is checked when the config loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slm_fusion.routing.base import (
    ROUTERS,
    ExecutionPlan,
    RouteDecision,
    RouterBase,
    RouterContext,
    RoutingConfigError,
    RoutingRequest,
    build_router,
)


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


def _virtual_items(raw: dict[str, Any] | list[Any]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(raw, dict):
        return list(raw.items())
    items = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RoutingConfigError(f"virtual_models[{i}]: each entry needs a `name`")
        spec = dict(entry)
        items.append((spec.pop("name"), spec))
    return items


def build_virtual_models(
    routers: dict[str, Any], virtual_models: dict[str, Any] | list[Any], models: set[str],
    base_dir: Path | None = None, load_models: bool = True,
) -> dict[str, VirtualModel]:
    """Build every router and virtual model; RoutingConfigError names the bad entry and the fix.

    `load_models=False` checks everything (models, files, labels, embedding ids) without loading embedding models.
    """

    ctx = RouterContext(models=set(models), base_dir=base_dir or Path.cwd(), load_models=load_models)
    for name, spec in (routers or {}).items():
        if name in models:
            raise RoutingConfigError(f"routers.{name}: name clashes with a configured model; rename the router")
        ctx.routers[name] = build_router(name, spec, ctx)
    out: dict[str, VirtualModel] = {}
    for name, spec in _virtual_items(virtual_models or {}):
        where = f"virtual_models.{name}"
        if name in models:
            raise RoutingConfigError(f"{where}: name clashes with a configured model; pick another name")
        if not isinstance(spec, dict):
            raise RoutingConfigError(f"{where}: must be a mapping like {{router: NAME}} or {{fusion: vote, models: [...]}}")
        spec = dict(spec)
        if "fusion" in spec and "router" not in spec:  # the short form: `{fusion: vote, models: [...]}`
            router: RouterBase = build_router(name, {"type": "fusion", **spec}, ctx)
        elif "router" in spec:
            ref = spec.pop("router")
            if ref in ctx.routers:
                if spec:
                    raise RoutingConfigError(
                        f"{where}: router '{ref}' is defined in `routers:`; move {sorted(spec)} there"
                    )
                router = ctx.routers[ref]
            elif ref in ROUTERS:
                router = build_router(name, {"type": ref, **spec}, ctx)
            else:
                raise RoutingConfigError(
                    f"{where}.router: '{ref}' is neither a router in `routers:` ({sorted(ctx.routers)}) "
                    f"nor a router type ({sorted(ROUTERS)})"
                )
        else:
            raise RoutingConfigError(f"{where}: give `router: NAME` or `fusion: vote|first_valid` with `models`")
        out[name] = VirtualModel(name, router)
    return out
