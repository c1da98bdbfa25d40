"""Rules router, config-time validation of routing sections, replica health and the fallback chain (no models)."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from pydantic import ValidationError

from reasonlite.config import format_validation_error
from slm_fusion import protocol as P
from slm_fusion.config import FusionConfig
from slm_fusion.errors import InvalidRequest, UpstreamError
from slm_fusion.routing import (
    DeploymentHealth,
    RoutingConfigError,
    RoutingRequest,
    build_routers,
    routing_request,
    with_fallbacks,
)

MODELS = [
    {"name": n, "backend": "openai", "model": n, "base_url": "http://127.0.0.1:9/v1"}
    for n in ("general", "coder", "math", "big")
]
RULES = {
    "type": "rules",
    "default": "general",
    "rules": [
        {"model": "big", "name": "premium", "header": {"X-Tier": "premium|gold"}},
        {"model": "big", "user": "vip-.*"},
        {"model": "coder", "regex": r"```|\bdef |Traceback"},
        {"model": "math", "keywords": ["how many", "total", "percent"]},
        {"model": "big", "min_chars": 300},
        {"model": "big", "min_messages": 5},
    ],
}


def _config(**extra) -> FusionConfig:
    return FusionConfig.model_validate({"models": MODELS, **extra})


@pytest.fixture(scope="module")
def rules():
    return build_routers(_config(routers={"r": RULES}, virtual_models={"auto": {"router": "r"}}))["auto"].router


def _req(text: str, **kw) -> RoutingRequest:
    messages = kw.pop("messages", [{"role": "user", "content": text}])
    return RoutingRequest(messages=messages, text=text, **kw)


@pytest.mark.parametrize(
    ("text", "kw", "model", "why"),
    [
        ("Tell me a joke", {}, "general", "default"),
        ("Why does this fail?\nTraceback (most recent call last):", {}, "coder", "regex"),
        ("How many apples are left in total?", {}, "math", "keyword"),
        ("Give me a summary of the totality of art", {}, "general", "default"),  # word boundaries: no 'total'
        ("hi", {"headers": {"x-tier": "GOLD"}}, "big", "premium"),
        ("hi", {"headers": {"x-tier": "free"}}, "general", "default"),
        ("hi", {"user": "vip-42"}, "big", "user"),
        ("hi", {"user": "someone-vip-42"}, "general", "default"),  # user regex must match fully
        ("x" * 400, {}, "big", "chars"),
        ("hi", {"messages": [{"role": "user", "content": "a"}] * 6}, "big", "6 messages"),
    ],
)
def test_rules_first_match_wins(rules, text, kw, model, why):
    d = asyncio.run(rules.route(_req(text, **kw)))
    assert d.model == model
    assert why in d.reason
    assert d.router == "r"
    assert d.header().startswith("r;score=")


def test_rules_decide_without_suspending(rules):
    """The rules path never leaves the event loop (no thread hop): its coroutine finishes on the first step, through
    the virtual model the gateway awaits too."""
    vm = build_routers(_config(routers={"r": RULES}, virtual_models={"auto": {"router": "r"}}))["auto"]
    for coro in (rules.route(_req("How many in total?")), vm.route(_req("How many in total?"))):
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        assert done.value.value.model == "math"


def test_rule_order_matters(rules):
    # Both the code regex and the math keywords match: the earlier rule (coder) wins.
    d = asyncio.run(rules.route(_req("def f(): how many items in total?")))
    assert d.model == "coder"


def test_routing_request_from_wire_bodies():
    chat = P.ChatCompletionRequest(model="auto", user="u1", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "last one"}]},
    ])
    r = routing_request(chat, {"X-Tier": "gold"})
    assert (r.text, r.n_messages, r.user, r.headers, r.model) == ("last one", 4, "u1", {"x-tier": "gold"}, "auto")
    comp = P.CompletionRequest(model="auto", prompt="raw text")
    r = routing_request(comp)
    assert r.text == "raw text" and r.messages == [{"role": "user", "content": "raw text"}]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"virtual_models": {"auto": {"router": "missing"}}}, "virtual_models.auto.router: 'missing' is neither"),
        ({"virtual_models": {"general": {"router": "rules", "default": "general"}}},
         "virtual_models.general: name clashes with a configured"),
        ({"routers": {"general": {"type": "rules", "default": "general"}}}, "routers.general: name clashes"),
        ({"routers": {"r": {"type": "bogus"}}}, "routers.r: `type` must name a router class: one of cascade,"),
        ({"routers": {"r": {"default": "general"}}}, "routers.r: `type` must name a router class"),
        ({"routers": {"r": {"type": "rules", "default": "general", "rules": [{"model": "big", "regex": "("}]}}},
         "routers.r.rules.rules.0.regex: not a valid regex"),
        ({"routers": {"r": {"type": "rules", "default": "general", "colour": "red"}}},
         "routers.r.rules.colour: unknown field"),
        ({"virtual_models": {"v": {"router": "semantic", "exemplars": {"math": ["x"]}}}},
         "virtual_models.v.semantic.default: Field required"),
        ({"routers": {"r": RULES}, "virtual_models": {"v": {"router": "r", "default": "big"}}},
         "virtual_models.v: router 'r' is defined in `routers:`; move ['default'] there"),
        ({"virtual_models": {"v": {"models": ["general", "big"]}}}, "virtual_models.v: give `router: NAME`"),
        ({"virtual_models": [{"name": "v", "router": "rules", "default": "big"}, {"name": "v", "fusion": "vote"}]},
         "duplicate name 'v'"),
        ({"routing": {"fallbacks": {"general": ["ghost"]}}}, "routing.fallbacks.general: model 'ghost' is not"),
        ({"routing": {"fallbacks": {"general": ["general"]}}}, "its own fallback"),
        ({"routing": {"embedding_threads": 0}}, "routing.embedding_threads"),
    ],
)
def test_bad_routing_config_fails_when_the_config_loads(extra, message):
    """Everything the YAML alone decides fails in `FusionConfig` validation, before any router is built."""
    with pytest.raises(ValidationError) as e:
        _config(**extra)
    assert message in format_validation_error(e.value, schema=FusionConfig)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"routers": {"r": {**RULES, "default": "nope"}}, "virtual_models": {"auto": {"router": "r"}}},
         "model 'nope' is not configured"),
        ({"virtual_models": {"auto": {"router": "rules", "default": "general", "rules": [{"model": "x"}]}}},
         "model 'x' is not configured"),
        ({"routers": {"s": {"type": "semantic", "default": "general", "exemplars": {"math": []}}}},
         "empty exemplar set"),
        ({"routers": {"c": {"type": "classifier", "path": "/nonexistent/router.pkl"}}}, "router train"),
        ({"virtual_models": {"ens": {"fusion": "vote", "models": ["general", "ghost"]}}}, "'ghost' is not configured"),
        ({"routers": {"k": {"type": "cascade", "models": ["general", "big"], "classifier": "nope"}}},
         "not a classifier router"),
    ],
)
def test_bad_routing_config_fails_when_the_routers_are_built(extra, message):
    with pytest.raises(RoutingConfigError, match=message.replace("(", r"\(")):
        build_routers(_config(**extra))


def test_routing_sections_are_typed_when_the_config_loads():
    from slm_fusion.routing import RouterRef, RoutingSettings
    from slm_fusion.routing.fusion import OutputFusion
    from slm_fusion.routing.rules import RulesRouter

    cfg = _config(routers={"r": RULES},
                  virtual_models=[{"name": "auto", "router": "r"}, {"name": "inline", "router": "rules", "default": "big"},
                                  {"name": "ens", "fusion": "first_valid", "models": ["general", "big"]}],
                  routing={"fallbacks": {"general": ["big"]}})
    assert isinstance(cfg.routers["r"], RulesRouter.Config) and cfg.routers["r"].rules[2].model == "coder"
    assert cfg.virtual_models["auto"] == RouterRef(router="r")
    assert isinstance(cfg.virtual_models["inline"], RulesRouter.Config) and cfg.virtual_models["inline"].type == "rules"
    assert isinstance(cfg.virtual_models["ens"], OutputFusion.Config) and cfg.virtual_models["ens"].fusion == "first_valid"
    assert isinstance(cfg.routing, RoutingSettings) and cfg.routing.chain("general") == ["general", "big"]
    # A dumped config loads back to the same sections (the canonical shape validates as written), and a pickled
    # one too (Ray ships the config to its replicas).
    assert FusionConfig.model_validate(cfg.model_dump()).virtual_models == cfg.virtual_models
    assert pickle.loads(pickle.dumps(cfg)).routers == cfg.routers


def test_deployment_health_cooldown_expires():
    now = [100.0]
    h = DeploymentHealth(2, allowed_fails=2, cooldown_s=10.0, clock=lambda: now[0])
    assert h.pick([0, 0]) == 0 and h.pick([0, 0]) == 1  # equally busy: round robin
    assert h.pick([3, 1]) == 1  # least in flight
    h.failure(0)
    assert h.healthy(0)  # one failure is allowed
    h.failure(0)
    assert not h.healthy(0) and h.available()
    assert h.pick([0, 5]) == 1  # the cooling replica is skipped even though it is idle
    now[0] += 10.5
    assert h.healthy(0) and h.pick([0, 5]) == 0
    h.failure(1)
    h.success(1)  # a success resets the count
    h.failure(1)
    assert h.healthy(1)


def test_with_fallbacks_order_and_errors():
    calls = []

    async def attempt(model):
        calls.append(model)
        if model == "a":
            raise UpstreamError("boom")
        if model == "bad-request":
            raise InvalidRequest("nope")
        return model.upper()

    model, result, tried = asyncio.run(with_fallbacks(["a", "b", "c"], attempt))
    assert (model, result, calls) == ("b", "B", ["a", "b"]) and tried == ["a: UpstreamError"]
    calls.clear()
    with pytest.raises(InvalidRequest):  # a bad request is not retried elsewhere
        asyncio.run(with_fallbacks(["bad-request", "b"], attempt))
    assert calls == ["bad-request"]
    calls.clear()
    model, _, _ = asyncio.run(with_fallbacks(["a", "b"], attempt, available=lambda m: m != "a"))
    assert model == "b" and calls == ["b"]  # a cooling model is skipped
    assert asyncio.run(with_fallbacks(["a", "b"], attempt, available=lambda m: m != "a"))[2] == ["a: cooling down"]
