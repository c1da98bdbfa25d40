"""The typed routing sections of `FusionConfig`, built from the router registry and validated when the YAML loads.

  routers:         name -> `RouterSpec`: a discriminated union on `type` over every registered router's `Config`
  virtual_models:  name -> `VirtualModelSpec`: `{router: NAME}` (a `RouterRef` to an entry of `routers:`) or a router
                   written inline, `{router: KIND, ...}`; `{fusion: vote, models: [...]}` is short for
                   `{router: fusion, fusion: vote, models: [...]}`; a list of entries with `name` is accepted too
  routing:         `RoutingSettings` (fallbacks, cooldowns; slm_fusion.routing.replicas)

What needs files or embedding models (exemplars, a classifier's labels, the models those can choose) is checked when
the routers are built (`build_routers`, which `slm-fusion check` runs without loading embedding models).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model

from slm_fusion.context.settings import MODEL_CONTEXT_DESCRIPTION, ModelContext
from slm_fusion.routing import cascade, classifier, fusion, rules, semantic  # noqa: F401 — importing registers them
from slm_fusion.routing.base import ROUTERS
from slm_fusion.routing.replicas import RoutingSettings


class RouterRef(BaseModel):
    """A virtual model served by a router defined in `routers:`."""

    model_config = ConfigDict(extra="forbid")
    router: str = Field(..., description="Name of an entry of `routers:`.")
    context: ModelContext | None = Field(None, description=MODEL_CONTEXT_DESCRIPTION)


def _kind(value: Any) -> str | None:
    """The union tag of one entry: `ref` for a `RouterRef`, else the router kind its `type` names."""
    if isinstance(value, dict):
        return "ref" if "router" in value else value.get("type")
    return "ref" if isinstance(value, RouterRef) else getattr(value, "type", None)


_kinds = [Annotated[cls.Config, Tag(kind)] for kind, cls in ROUTERS.items()]
_type_error = f"`type` must name a router class: one of {', '.join(sorted(ROUTERS))}"
RouterSpec = Annotated[Union[tuple(_kinds)],  # noqa: UP007 — a Union built from a tuple
                       Discriminator(_kind, custom_error_type="router_type", custom_error_message=_type_error)]


def _virtual(config: type[BaseModel]) -> type[BaseModel]:
    """A router's `Config` written inline under `virtual_models:`, which may also declare the name's `context:`
    (a module attribute under its own name, where pickle finds it)."""
    name = f"Virtual{config.__name__}"
    cls = create_model(name, __base__=config, __module__=__name__,
                       context=(ModelContext | None, Field(None, description=MODEL_CONTEXT_DESCRIPTION)))
    globals()[name] = cls
    return cls


_virtual_kinds = [Annotated[_virtual(cls.Config), Tag(kind)] for kind, cls in ROUTERS.items()]
VirtualModelSpec = Annotated[Union[(Annotated[RouterRef, Tag("ref")], *_virtual_kinds)],
                             Discriminator(_kind, custom_error_type="router_type", custom_error_message=_type_error)]


def canonical_virtual_models(raw: Any, router_names: set[str]) -> Any:
    """The YAML users write, in the shape `VirtualModelSpec` validates: a list becomes a mapping by `name`, the
    fusion short form gets `type: fusion`, and `router: KIND` (not a name in `routers:`) becomes `type: KIND`.
    A name in `routers:` wins over a kind of the same name, as it always did."""
    if isinstance(raw, list):
        items: dict[str, Any] = {}
        for i, entry in enumerate(raw):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError(f"virtual_models[{i}]: each entry needs a `name`")  # noqa: TRY004 — pydantic reports ValueError
            spec = dict(entry)
            name = spec.pop("name")
            if name in items:
                raise ValueError(f"virtual_models[{i}]: duplicate name '{name}'; each virtual model needs its own")
            items[name] = spec
        raw = items
    if not isinstance(raw, dict):
        return raw  # pydantic says what a mapping should look like
    out: dict[str, Any] = {}
    for name, spec in raw.items():
        if isinstance(spec, dict) and "type" not in spec:
            spec = dict(spec)
            ref = spec.get("router")
            if ref is None and "fusion" in spec:
                spec["type"] = "fusion"
            elif isinstance(ref, str) and ref not in router_names and ref in ROUTERS:
                spec["type"] = spec.pop("router")
            elif isinstance(ref, str) and ref in router_names and set(spec) - {"router", "context"}:
                raise ValueError(f"virtual_models.{name}: router '{ref}' is defined in `routers:`; move "
                                 f"{sorted(set(spec) - {'router', 'context'})} there")
            elif ref is None:
                raise ValueError(f"virtual_models.{name}: give `router: NAME` (an entry of `routers:`), "
                                 f"`router: KIND` with its settings (one of {sorted(ROUTERS)}), or "
                                 "`fusion: vote|first_valid` with `models`")
        out[name] = spec
    return out


def check_names(routers: dict[str, Any], virtual_models: dict[str, Any], models: set[str],
                settings: RoutingSettings) -> None:
    """What ties the routing sections to each other and to `models:`; ValueError names the field and the fix."""
    for name in routers:
        if name in models:
            raise ValueError(f"routers.{name}: name clashes with a configured model; rename the router")
    for name, spec in virtual_models.items():
        if name in models:
            raise ValueError(f"virtual_models.{name}: name clashes with a configured model; pick another name")
        if isinstance(spec, RouterRef) and spec.router not in routers:
            raise ValueError(f"virtual_models.{name}.router: '{spec.router}' is neither a router in `routers:` "
                             f"({sorted(routers)}) nor a router type ({sorted(ROUTERS)})")
    for model, chain in settings.fallbacks.items():
        for name in [model, *chain]:
            if name not in models:
                raise ValueError(f"routing.fallbacks.{model}: model '{name}' is not configured; use one of "
                                 f"{sorted(models)}")
        if model in chain:
            raise ValueError(f"routing.fallbacks.{model}: a model cannot be its own fallback")
