"""Routing: `await Router.route(request) -> RouteDecision | ExecutionPlan` and a registry of routers (`rules`,
`semantic`, `classifier`, `cascade`, `fusion`), virtual model names that use them, replica choice and fallbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slm_fusion.routing import cascade, classifier, fusion, rules, semantic  # noqa: F401 — importing registers them
from slm_fusion.routing.base import (
    ROUTERS,
    CallModel,
    ExecutionPlan,
    LabelledPrompt,
    RouteDecision,
    Router,
    RouterBase,
    RouterContext,
    RoutingConfigError,
    RoutingRequest,
    build_router,
    load_labelled,
    register,
    routing_request,
)
from slm_fusion.routing.embeddings import set_embedding_threads
from slm_fusion.routing.replicas import DeploymentHealth, RoutingSettings, is_retryable, with_fallbacks
from slm_fusion.routing.virtual import VirtualModel, build_virtual_models


def build_routers(config: Any, base_dir: str | Path | None = None, load_models: bool = True) -> dict[str, VirtualModel]:
    """Virtual model name -> `VirtualModel`, from a `FusionConfig` (raises RoutingConfigError on a bad config)."""
    models = {m.name for m in config.models}
    settings = RoutingSettings.parse(getattr(config, "routing", None), models)
    set_embedding_threads(settings.embedding_threads)
    return build_virtual_models(config.routers, config.virtual_models, models,
                                Path(base_dir) if base_dir else None, load_models=load_models)


def routing_settings(config: Any) -> RoutingSettings:
    return RoutingSettings.parse(getattr(config, "routing", None), {m.name for m in config.models})


__all__ = [
    "ROUTERS", "CallModel", "DeploymentHealth", "ExecutionPlan", "LabelledPrompt", "RouteDecision", "Router",
    "RouterBase", "RouterContext", "RoutingConfigError", "RoutingRequest", "RoutingSettings", "VirtualModel",
    "build_router", "build_routers", "build_virtual_models", "is_retryable", "load_labelled", "register",
    "routing_request", "routing_settings", "with_fallbacks",
]
