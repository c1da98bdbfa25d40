"""`rules` router: ordered conditions on the prompt and request metadata; the first rule that matches wins.

```yaml
routers:
  by-rules:
    type: rules
    default: general
    rules:
      - {model: coder, regex: "```|\\bdef |Traceback"}
      - {model: math, keywords: [how many, total, percent]}
      - {model: big, header: {x-tier: premium}}
      - {model: big, min_chars: 2000}
```
All conditions given in one rule must hold (AND); a rule with none is a catch-all. Keyword and regex tests look at
the last user turn, case-insensitively.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slm_fusion.routing.base import RouteDecision, RouterBase, RouterContext, RoutingRequest, register


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., description="Model chosen when every condition of this rule holds.")
    name: str | None = Field(None, description="Shown in the route reason; default rule #index.")
    regex: str | None = Field(None, description="Python regex searched in the last user turn (case-insensitive).")
    keywords: list[str] = Field(default_factory=list, description="Any of these words/phrases in the last user turn.")
    header: dict[str, str] = Field(default_factory=dict, description="Header name -> regex its value must match.")
    user: str | None = Field(None, description="Regex the request's `user` field must fully match.")
    min_messages: int | None = Field(None, ge=0)
    max_messages: int | None = Field(None, ge=0)
    min_chars: int | None = Field(None, ge=0, description="Total characters over all messages.")
    max_chars: int | None = Field(None, ge=0)

    @field_validator("regex", "user")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regex ({e}): {v!r}") from None
        return v

    @field_validator("header")
    @classmethod
    def _header_regexes(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"header '{name}': not a valid regex ({e}): {pattern!r}") from None
        return {k.lower(): p for k, p in v.items()}


class _CompiledRule:
    def __init__(self, rule: Rule, index: int) -> None:
        self.rule = rule
        self.label = rule.name or f"rule #{index}"
        self.regex = re.compile(rule.regex, re.IGNORECASE) if rule.regex else None
        words = [re.escape(k.strip()) for k in rule.keywords if k.strip()]
        # Word boundaries so "sum" does not match "summary"; phrases keep their inner spaces.
        self.keywords = re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE) if words else None
        self.headers = {k: re.compile(p, re.IGNORECASE) for k, p in rule.header.items()}
        self.user = re.compile(rule.user) if rule.user else None

    def match(self, req: RoutingRequest) -> str | None:
        """Why it matched (for the route reason), or None."""
        r = self.rule
        why: list[str] = []
        if self.regex:
            m = self.regex.search(req.text)
            if not m:
                return None
            why.append(f"regex {m.group(0)[:30]!r}")
        if self.keywords:
            m = self.keywords.search(req.text)
            if not m:
                return None
            why.append(f"keyword {m.group(0).lower()!r}")
        for name, pattern in self.headers.items():
            value = req.headers.get(name)
            if value is None or not pattern.fullmatch(value):
                return None
            why.append(f"header {name}")
        if self.user:
            if req.user is None or not self.user.fullmatch(req.user):
                return None
            why.append("user")
        if r.min_messages is not None and req.n_messages < r.min_messages:
            return None
        if r.max_messages is not None and req.n_messages > r.max_messages:
            return None
        if r.min_chars is not None and req.prompt_chars < r.min_chars:
            return None
        if r.max_chars is not None and req.prompt_chars > r.max_chars:
            return None
        if any(v is not None for v in (r.min_messages, r.max_messages)):
            why.append(f"{req.n_messages} messages")
        if any(v is not None for v in (r.min_chars, r.max_chars)):
            why.append(f"{req.prompt_chars} chars")
        return ", ".join(why) or "catch-all"


@register("rules")
class RulesRouter(RouterBase):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rules: list[Rule] = Field(default_factory=list, description="Checked in order; the first match wins.")
        default: str = Field(..., description="Model used when no rule matches.")

    def setup(self, ctx: RouterContext) -> None:
        self.rules = [_CompiledRule(r, i) for i, r in enumerate(self.cfg.rules)]

    def targets(self) -> set[str]:
        return {r.model for r in self.cfg.rules} | {self.cfg.default}

    async def route(self, request: RoutingRequest) -> RouteDecision:
        # Regexes over one prompt take microseconds: decided on the event loop, never suspending (no thread hop).
        for rule in self.rules:
            why = rule.match(request)
            if why is not None:
                return self.decide(rule.rule.model, 1.0, f"{rule.label}: {why}")
        return self.decide(self.cfg.default, 0.0, "no rule matched: default")
