"""`semantic` router: embed the last user turn and compare it with exemplar prompts of each specialist.

```yaml
routers:
  topic:
    type: semantic
    default: general              # below `threshold` similarity nobody is a specialist
    method: knn                   # knn (mean similarity of each specialist's k nearest exemplars) | centroid
    k: 5
    threshold: 0.35
    exemplars:
      retail: ["A shop sells 12 mugs at $4 ...", ...]   # inline list ...
      math: data/math_prompts.txt                        # ... or a file: one prompt per line, or JSONL rows
    exemplars_file: examples/routing_labelled.jsonl      # and/or a labelled JSONL {"prompt", "model"}
```
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from reasonlite.jsonl import JsonlError, iter_jsonl
from slm_fusion.routing.base import (
    RouteDecision,
    RouterBase,
    RouterContext,
    RoutingConfigError,
    RoutingRequest,
    load_labelled,
    register,
)
from slm_fusion.routing.embeddings import DEFAULT_EMBEDDING, EMBEDDING_MODELS, get_embedder


def _prompts_from_file(path) -> list[str]:
    if not path.exists():
        raise RoutingConfigError(f"{path}: exemplar file not found")
    if path.suffix == ".jsonl":
        out = []
        for _, obj in iter_jsonl(path, errors="yield"):
            if isinstance(obj, JsonlError):
                raise RoutingConfigError(str(obj))
            out.append(obj.get("prompt") or obj.get("text") or obj.get("question") if isinstance(obj, dict) else obj)
        return [p for p in out if isinstance(p, str) and p.strip()]
    with path.open(encoding="utf-8") as f:  # one prompt per line
        return [ln.rstrip("\n") for ln in f if ln.strip()]


@register("semantic")
class SemanticRouter(RouterBase):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        default: str = Field(..., description="Model used when no exemplar set is similar enough.")
        exemplars: dict[str, list[str] | str] = Field(
            default_factory=dict, description="Model -> example prompts (a list, or a .txt/.jsonl file of prompts)."
        )
        exemplars_file: str | None = Field(None, description="Labelled JSONL with `prompt` and `model` per row.")
        method: Literal["knn", "centroid"] = "knn"
        k: int = Field(5, ge=1, description="Nearest exemplars per specialist averaged (knn).")
        threshold: float = Field(0.35, ge=-1.0, le=1.0, description="Minimum cosine similarity to pick a specialist.")
        embedding: str = Field(DEFAULT_EMBEDDING, description="Embedding model (see routing.embeddings).")
        labels: dict[str, str] = Field(
            default_factory=dict, description="Exemplar label -> model serving it (default: the label is the model)."
        )

    def setup(self, ctx: RouterContext) -> None:
        if self.cfg.embedding not in EMBEDDING_MODELS:
            raise RoutingConfigError(
                f"{self.where}.embedding: unknown '{self.cfg.embedding}'; use one of {sorted(EMBEDDING_MODELS)}"
            )
        by_model: dict[str, list[str]] = defaultdict(list)
        for model, prompts in self.cfg.exemplars.items():
            items = _prompts_from_file(ctx.path(prompts)) if isinstance(prompts, str) else prompts
            by_model[model].extend(p for p in items if p.strip())
        if self.cfg.exemplars_file:
            for row in load_labelled(ctx.path(self.cfg.exemplars_file)):
                by_model[row.model].append(row.prompt)
        if not by_model:
            raise RoutingConfigError(
                f"{self.where}: no exemplars; give `exemplars: {{model: [prompts...]}}` or `exemplars_file`"
            )
        for model, prompts in by_model.items():
            if not prompts:
                raise RoutingConfigError(f"{self.where}.exemplars.{model}: empty exemplar set; add prompts")
            ctx.check_model(self.cfg.labels.get(model, model), f"{self.where}.exemplars ({model})")
        self.labels = sorted(by_model)
        if not ctx.load_models:
            return
        self.embedder = get_embedder(self.cfg.embedding)
        texts = [p for m in self.labels for p in by_model[m]]
        self.owner = np.array([i for i, m in enumerate(self.labels) for _ in by_model[m]])
        self.vectors = self.embedder.embed(texts)
        self.members = [np.flatnonzero(self.owner == i) for i in range(len(self.labels))]
        centroids = np.stack([self.vectors[m].mean(0) for m in self.members])
        self.centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)

    def targets(self) -> set[str]:
        return {self.cfg.labels.get(label, label) for label in self.labels} | {self.cfg.default}

    def scores(self, vector: np.ndarray) -> tuple[int, float, str]:
        """(label index, score, how) for one embedded prompt."""
        if self.cfg.method == "centroid":
            sims = self.centroids @ vector
            best = int(np.argmax(sims))
            return best, float(sims[best]), "centroid"
        # Per specialist, the mean similarity of its k nearest exemplars: unlike a plain k-NN vote this does not
        # favour the specialist with the most exemplars.
        sims = self.vectors @ vector
        scores = np.empty(len(self.labels))
        for i, members in enumerate(self.members):
            own = sims[members]
            k = min(self.cfg.k, len(own))
            scores[i] = np.partition(own, len(own) - k)[-k:].mean()
        best = int(np.argmax(scores))
        return best, float(scores[best]), f"knn top-{self.cfg.k} mean"

    async def route(self, request: RoutingRequest) -> RouteDecision:
        # The embedding takes milliseconds of CPU: off the event loop. Scoring it against the exemplars is one matmul.
        vector = await asyncio.to_thread(self.embedder.embed_one, request.text)
        best, score, how = self.scores(vector)
        label = self.labels[best]
        if score < self.cfg.threshold:
            return self.decide(self.cfg.default, score, f"nearest {label} {score:.2f}<{self.cfg.threshold}: default")
        return self.decide(self.cfg.labels.get(label, label), score, f"{label}: {how} similarity {score:.2f}", label)
