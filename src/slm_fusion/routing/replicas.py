"""Load-aware replica choice, per-deployment cooldown, and fallbacks to other models on errors or timeouts.

```yaml
routing:
  allowed_fails: 3        # consecutive failures of one deployment (replica) before it is benched ...
  cooldown_s: 30          # ... for this long; requests go to its healthy siblings meanwhile
  fallbacks:              # tried in order when a model errors (5xx, 429, connection) or times out;
    smol: [smol-gguf, big]  # for streams this happens before the first byte is sent
  embedding_threads: 1    # threads of the semantic/classifier routers' embedder (2: faster decisions, more contention)
```
A deployment is one backend instance of a model (`replicas: N` gives N). The least busy healthy one is chosen;
when every deployment of a model is cooling down, the model is skipped in a fallback chain (used only when it is
the last option left).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class RoutingSettings(BaseModel):
    """The `routing:` section of the gateway config."""

    model_config = ConfigDict(extra="forbid")
    allowed_fails: int = Field(3, ge=1, description="Consecutive failures before a deployment cools down.")
    cooldown_s: float = Field(30.0, ge=0.0, description="How long a failing deployment is skipped.")
    fallbacks: dict[str, list[str]] = Field(default_factory=dict, description="Model -> models tried after it fails.")
    embedding_threads: int = Field(
        1, ge=1, description="Intra-op threads of the routing embedder: 2 decides ~1.5x faster, but competes with "
                             "model backends for CPU.")

    def chain(self, model: str) -> list[str]:
        return [model, *self.fallbacks.get(model, [])]


class DeploymentHealth:
    """Failure counts and cooldowns of the deployments (replicas) of one model."""

    def __init__(self, n: int, allowed_fails: int = 3, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed_fails = allowed_fails
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.fails = [0] * n
        self.cooling_until = [0.0] * n
        self._picks = 0
        self.last_pick = [0] * n  # round-robin among equally busy replicas

    def healthy(self, i: int) -> bool:
        return self.cooling_until[i] <= self.clock()

    def available(self) -> bool:
        return any(self.healthy(i) for i in range(len(self.fails)))

    def pick(self, active: list[int]) -> int:
        """Least in-flight healthy deployment; when all are cooling, the one that recovers first."""
        healthy = [i for i in range(len(active)) if self.healthy(i)]
        if healthy:
            i = min(healthy, key=lambda i: (active[i], self.fails[i], self.last_pick[i]))
        else:
            i = min(range(len(active)), key=lambda i: self.cooling_until[i])
        self._picks += 1
        self.last_pick[i] = self._picks
        return i

    def success(self, i: int) -> None:
        self.fails[i] = 0

    def failure(self, i: int) -> None:
        self.fails[i] += 1
        if self.fails[i] >= self.allowed_fails:
            self.cooling_until[i] = self.clock() + self.cooldown_s
            self.fails[i] = 0


def is_retryable(exc: BaseException) -> bool:
    """Errors another deployment or model may not have: upstream failures, timeouts, overload (not bad requests)."""
    if isinstance(exc, TimeoutError | ConnectionError | asyncio.TimeoutError):
        return True
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return False


async def with_fallbacks(
    chain: list[str], attempt: Callable[[str], Awaitable[T]], available: Callable[[str], bool] | None = None,
) -> tuple[str, T, list[str]]:
    """Run `attempt(model)` along `chain` until one succeeds: (model, result, models tried with their errors).

    Models whose deployments are all cooling down are skipped unless nothing else is left. A non-retryable error
    (e.g. 400 invalid request) is raised at once: another model would refuse it too.
    """
    candidates = [m for m in chain if available is None or available(m)] or chain[-1:]
    tried = [f"{m}: cooling down" for m in dict.fromkeys(chain) if m not in candidates]
    for i, model in enumerate(candidates):
        try:
            return model, await attempt(model), tried
        except Exception as e:
            if i == len(candidates) - 1 or not is_retryable(e):
                raise
            tried.append(f"{model}: {type(e).__name__}")
    raise AssertionError("unreachable")
