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
from slm_fusion.routing.specs import RouterRef, RouterSpec, VirtualModelSpec
from slm_fusion.routing.virtual import VirtualModel, build_virtual_models


def build_routers(config: Any, base_dir: str | Path | None = None, load_models: bool = True) -> dict[str, VirtualModel]:
    """Virtual model name -> `VirtualModel`, from a validated `FusionConfig` (RoutingConfigError: an exemplar or
    classifier file that cannot work, or a model they name that is not configured)."""
    set_embedding_threads(config.routing.embedding_threads)
    return build_virtual_models(config.routers, config.virtual_models, {m.name for m in config.models},
                                Path(base_dir) if base_dir else None, load_models=load_models)


__all__ = [
    "ROUTERS", "CallModel", "DeploymentHealth", "ExecutionPlan", "LabelledPrompt", "RouteDecision", "Router",
    "RouterBase", "RouterContext", "RouterRef", "RouterSpec", "RoutingConfigError", "RoutingRequest",
    "RoutingSettings", "VirtualModel", "VirtualModelSpec", "build_router", "build_routers", "build_virtual_models",
    "is_retryable", "load_labelled", "register", "routing_request", "with_fallbacks",
]
