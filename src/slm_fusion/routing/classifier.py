"""`classifier` router: a logistic regression on prompt embeddings, trained from a labelled JSONL (prompt, model).

Train: `slm-fusion router train --data labelled.jsonl --out router.pkl`. The file stores the classifier together
with the embedding model's name, id and dimension, so a router file made for one embedding model is refused (at
config load) when the gateway embeds with another.

Probabilities are calibrated with `CalibratedClassifierCV` (sigmoid, 3 folds) when every class has enough rows;
with less data LR's own `predict_proba` is used. A cascade reads them as confidence. By default the 3 fold models are
kept and averaged (sturdier on small label sets); `single_fit=True` (`router train --single-fit`) is sklearn's
`ensemble=False`: one LR fit on every row plus calibrators fit on out-of-fold scores, so a decision costs one LR
(~0.5 ms) instead of three (~1.6 ms), at the same held-out accuracy on benchmarks/bench_routing.py's 663 rows.

```yaml
routers:
  learned: {type: classifier, path: router.pkl, threshold: 0.5, default: general}
```
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slm_fusion.routing.base import (
    LabelledPrompt,
    RouteDecision,
    RouterBase,
    RouterContext,
    RoutingConfigError,
    RoutingRequest,
    register,
)
from slm_fusion.routing.embeddings import DEFAULT_EMBEDDING, EMBEDDING_INFO, get_embedder

FORMAT = "slm-fusion-router-classifier/1"
MIN_PER_CLASS_TO_CALIBRATE = 15  # 3 calibration folds with at least 5 rows of each class


def train_classifier(
    rows: list[LabelledPrompt], out: str | Path | None = None, *, embedding: str = DEFAULT_EMBEDDING,
    calibrate: bool | None = None, c: float = 4.0, seed: int = 0, single_fit: bool = False,
) -> dict[str, Any]:
    """Fit on `rows`; save to `out` (joblib) when given. Returns the bundle (classifier + metadata)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression

    counts = Counter(r.model for r in rows)
    if len(counts) < 2:
        raise ValueError(f"a routing classifier needs at least 2 models in the labels, got {sorted(counts)}")
    embedder = get_embedder(embedding)
    x = embedder.embed([r.prompt for r in rows])
    y = np.array([r.model for r in rows])
    if calibrate is None:
        calibrate = min(counts.values()) >= MIN_PER_CLASS_TO_CALIBRATE
    lr = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf = CalibratedClassifierCV(lr, method="sigmoid", cv=3, ensemble=not single_fit) if calibrate else lr
    clf.fit(x, y)
    bundle = {
        "format": FORMAT,
        "classifier": clf,
        "labels": [str(label) for label in clf.classes_],
        "embedding": embedding,
        "embedding_model_id": embedder.model_id,
        "dim": embedder.dim,
        "calibrated": bool(calibrate),
        "single_fit": bool(calibrate and single_fit),
        "n_train": len(rows),
        "class_counts": dict(counts),
        "train_accuracy": float((clf.predict(x) == y).mean()),
        "created": time.time(),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(bundle, out)
    return bundle


def load_classifier(path: str | Path, embedding: str | None = None, load_model: bool = True) -> dict[str, Any]:
    """Load and check a saved router classifier; RoutingConfigError names what is wrong and how to fix it."""
    path = Path(path)
    if not path.exists():
        raise RoutingConfigError(
            f"{path}: router classifier file not found; train one with "
            f"`slm-fusion router train --data labelled.jsonl --out {path}`"
        )
    try:
        bundle = joblib.load(path)
    except Exception as e:  # noqa: BLE001 — any unpickling failure means the same thing to the user
        raise RoutingConfigError(f"{path}: not a router classifier file ({type(e).__name__}: {e})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise RoutingConfigError(f"{path}: not a router classifier file (expected format {FORMAT}); retrain it")
    name = embedding or bundle["embedding"]
    if embedding is not None and embedding != bundle["embedding"]:
        raise RoutingConfigError(
            f"{path}: trained on embedding model '{bundle['embedding']}' but the router uses '{embedding}'; "
            "retrain with the router's embedding model or change `embedding`"
        )
    if name not in EMBEDDING_INFO:
        raise RoutingConfigError(f"{path}: embedding model '{name}' is unknown here; use one of {sorted(EMBEDDING_INFO)}")
    model_id, dim = EMBEDDING_INFO[name]
    if load_model:
        embedder = get_embedder(name)
        model_id, dim = embedder.model_id, embedder.dim
    if model_id != bundle["embedding_model_id"] or dim != bundle["dim"]:
        raise RoutingConfigError(
            f"{path}: trained on {bundle['embedding_model_id']} ({bundle['dim']}-d) but '{name}' is "
            f"{model_id} ({dim}-d); retrain the router"
        )
    return bundle


@register("classifier")
class ClassifierRouter(RouterBase):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str = Field(..., description="Router file from `slm-fusion router train`.")
        threshold: float = Field(0.0, ge=0.0, le=1.0, description="Below this probability use `default`.")
        default: str | None = Field(None, description="Model used below `threshold` (required when threshold > 0).")
        embedding: str | None = Field(None, description="Embedding model; must be the one the file was trained on.")
        labels: dict[str, str] = Field(
            default_factory=dict, description="Trained label -> model serving it (default: the label is the model)."
        )

    def setup(self, ctx: RouterContext) -> None:
        if self.cfg.threshold > 0 and self.cfg.default is None:
            raise RoutingConfigError(f"{self.where}: `threshold` > 0 needs a `default` model")
        self.bundle = load_classifier(ctx.path(self.cfg.path), self.cfg.embedding, load_model=ctx.load_models)
        self.clf = self.bundle["classifier"]
        self.labels: list[str] = self.bundle["labels"]
        if ctx.load_models:
            self.embedder = get_embedder(self.bundle["embedding"])

    def targets(self) -> set[str]:
        mapped = {self.cfg.labels.get(label, label) for label in self.labels}
        return mapped | ({self.cfg.default} if self.cfg.default else set())

    def probabilities(self, text: str) -> dict[str, float]:
        """Blocking (embeds `text`): call it from a thread, as `route` does."""
        probs = self.clf.predict_proba(self.embedder.embed_one(text)[None, :])[0]
        return {label: float(p) for label, p in zip(self.labels, probs, strict=True)}

    def model_probabilities(self, text: str) -> dict[str, float]:
        """Probabilities per model (labels mapped to the same model add up)."""
        out: dict[str, float] = {}
        for label, p in self.probabilities(text).items():
            model = self.cfg.labels.get(label, label)
            out[model] = out.get(model, 0.0) + p
        return out

    async def route(self, request: RoutingRequest) -> RouteDecision:
        probs = await asyncio.to_thread(self.probabilities, request.text)  # the embedding stays off the event loop
        label = max(probs, key=probs.__getitem__)
        p = probs[label]
        if p < self.cfg.threshold and self.cfg.default:
            return self.decide(self.cfg.default, p, f"p({label})={p:.2f}<{self.cfg.threshold}: default")
        return self.decide(self.cfg.labels.get(label, label), p, f"p({label})={p:.2f}", label)
