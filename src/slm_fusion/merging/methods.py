"""Weight-space merge methods: small pure tensor functions behind a registry (in the spirit of mergekit).

Every method has the same signature::

    fn(tensors, base, weights, params, *, name, generator_seed) -> Tensor

* `tensors`  — one float32 tensor per input model, all the same shape;
* `base`     — the base model's float32 tensor, or None for methods that need no base;
* `weights`  — one float per input model (already resolved for this tensor name);
* `params`   — the method's parameters for this tensor: global ones as scalars (`normalize`, `lambda`, `t`, ...) and
  per-model ones as lists aligned with `tensors` (`density`);
* `name`     — the tensor's name: randomised methods derive their generator from it, so results do not depend on the
  order tensors are visited in;
* `generator_seed` — the config's seed.

Call methods through `MergeMethod.__call__`, which upcasts to float32, fills defaults and casts the result back.
Parameters given per tensor name (filters) or per layer (gradients) are turned into plain numbers by `resolve_param`
before they reach a method.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

MergeFn = Callable[..., Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and what it accepts."""

    name: str
    fn: MergeFn
    needs_base: bool
    model_params: dict[str, Any] = field(default_factory=dict)  # per input model, with defaults
    global_params: dict[str, Any] = field(default_factory=dict)  # once per merge, with defaults
    n_models: int | None = None  # exact number of input models, None = any >= 1
    description: str = ""

    def __call__(
        self,
        tensors: list[Tensor],
        base: Tensor | None = None,
        weights: list[float] | None = None,
        params: dict[str, Any] | None = None,
        *,
        name: str = "",
        generator_seed: int = 0,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Merge one tensor: compute in float32, return in `dtype` (default: the first input's dtype)."""
        if not tensors:
            raise ValueError(f"{self.name}: no input tensors for '{name}'")
        if self.n_models is not None and len(tensors) != self.n_models:
            raise ValueError(f"{self.name} merges exactly {self.n_models} models, got {len(tensors)} for '{name}'")
        if self.needs_base and base is None:
            raise ValueError(f"{self.name} needs a base tensor for '{name}': set `base_model` in the merge config")
        out_dtype = dtype or tensors[0].dtype
        weights = [float(w) for w in weights] if weights is not None else [1.0] * len(tensors)
        if len(weights) != len(tensors):
            raise ValueError(f"{self.name}: {len(weights)} weights for {len(tensors)} tensors ('{name}')")
        full = dict(self.global_params)
        for key, default in self.model_params.items():
            if key != "weight":
                full[key] = [default] * len(tensors)
        full.update(params or {})
        merged = self.fn(
            [t.float() for t in tensors],
            base.float() if base is not None else None,
            weights,
            full,
            name=name,
            generator_seed=generator_seed,
        )
        return merged.to(out_dtype)


MERGE_METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    needs_base: bool,
    model_params: dict[str, Any] | None = None,
    global_params: dict[str, Any] | None = None,
    n_models: int | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register `fn` under `name` in MERGE_METHODS (the config's `merge_method` picks it)."""

    def wrap(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            needs_base=needs_base,
            model_params=dict(model_params or {"weight": 1.0}),
            global_params=dict(global_params or {}),
            n_models=n_models,
            description=(fn.__doc__ or "").strip().splitlines()[0],
        )
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------------------------------
# Parameter resolution: filters by tensor name and gradients across layers.

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.{i}.` in HF names), None for embeddings/norm/head."""
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(1)) if match else None


def resolve_param(value: Any, tensor_name: str, num_layers: int | None) -> Any:
    """Turn a parameter as written in the config into the plain value for one tensor.

    * a scalar (number, bool, string) is returned as is;
    * a list of rules ``[{"filter": "self_attn", "value": 0.3}, {"value": 0.5}]`` picks the first rule whose `filter`
      is a substring of the tensor name (a rule without filter matches everything), then resolves its value;
    * a list of numbers is a gradient: anchors spread evenly from the first layer (0) to the last (1), linearly
      interpolated at this tensor's layer. Like mergekit, tensors outside the layer stack take the ends: embeddings
      the first anchor, everything after the layers (final norm, lm_head) the last one.
    """
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for rule in value:
            flt = rule.get("filter")
            if flt is None or flt in tensor_name:
                return resolve_param(rule["value"], tensor_name, num_layers)
        raise ValueError(
            f"no parameter rule matches tensor '{tensor_name}': add a rule without `filter` as the default"
        )
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list is not a valid parameter gradient")
        anchors = [float(v) for v in value]
        if len(anchors) == 1:
            return anchors[0]
        layer = layer_index(tensor_name)
        if layer is None:
            pos = 0.0 if "embed" in tensor_name else 1.0
        else:
            if not num_layers:
                raise ValueError(f"gradient parameter needs the number of layers to place '{tensor_name}'")
            pos = layer / (num_layers - 1) if num_layers > 1 else 0.0
        scaled = min(max(pos, 0.0), 1.0) * (len(anchors) - 1)
        lo = int(scaled)
        hi = min(lo + 1, len(anchors) - 1)
        frac = scaled - lo
        return anchors[lo] * (1.0 - frac) + anchors[hi] * frac
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks shared by several methods.
#
# They loop over models and accumulate in place instead of stacking: on a 113 MB embedding matrix, a
# `torch.stack(...) * weights` form holds ~2n extra copies, the loops hold one or two.


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the top-`density` fraction of entries by magnitude (TIES 'trim'), zero the rest."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.flatten()
    magnitude = flat.abs()
    # kthvalue finds the threshold in linear time (topk is ~3x slower on a 28M-entry embedding); entries equal to
    # the threshold are then taken in index order until exactly k are kept.
    threshold = magnitude.kthvalue(flat.numel() - k + 1).values
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(magnitude == threshold).nonzero().flatten()[:missing]] = True
    return (flat * keep).view_as(delta)


def tensor_generator(seed: int, name: str, model_index: int) -> torch.Generator:
    """A generator determined only by (seed, tensor name, model index): reproducible and order-independent."""
    digest = hashlib.sha256(f"{seed}|{name}|{model_index}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def dare_drop(delta: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: drop each entry with probability 1 - density, scale survivors by 1/density (keeps the expectation)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    kept = delta * keep
    return kept.div_(density) if rescale else kept


def weighted_sum(tensors: list[Tensor], weights: list[float], normalize: bool) -> Tensor:
    """sum_i w_i t_i, divided by sum_i w_i when `normalize`."""
    out = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=weight)
    if normalize:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        out.div_(total)
    return out


def sign_consensus_merge(deltas: list[Tensor], weights: list[float], normalize: bool) -> Tensor:
    """TIES 'elect' + 'disjoint merge' over (already sparsified) task vectors.

    The elected sign of each entry is the sign of the weighted sum (its total mass); only entries that are non-zero
    and agree with it are kept, and with `normalize` they are averaged by their weights (disjoint mean).
    """
    elected = weighted_sum(deltas, weights, normalize=False).sign_()
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    for delta, weight in zip(deltas, weights, strict=True):
        agree = (delta * elected) > 0  # same sign as elected and non-zero, in one pass
        mixed.add_(delta * agree, alpha=weight)
        if divisor is not None:
            divisor.add_(agree, alpha=weight)
    if divisor is not None:
        divisor[divisor.abs() <= 1e-12] = 1.0  # entries where no model agrees are 0 already
        mixed.div_(divisor)
    return mixed


# ---------------------------------------------------------------------------------------------------------------------
# The methods.


@register("linear", needs_base=False, global_params={"normalize": True})
def linear(tensors, base, weights, params, *, name, generator_seed) -> Tensor:
    """Weighted average of the models (normalize divides by the sum of weights)."""
    return weighted_sum(tensors, weights, bool(params["normalize"]))


@register("task_arithmetic", needs_base=True, global_params={"normalize": False, "lambda": 1.0})
def task_arithmetic(tensors, base, weights, params, *, name, generator_seed) -> Tensor:
    """base + lambda * sum_i w_i (theta_i - base)."""
    mixed = torch.zeros_like(base)
    for tensor, weight in zip(tensors, weights, strict=True):
        mixed.add_(tensor - base, alpha=weight)
    if params["normalize"]:
        mixed.div_(sum(weights))
    return mixed.mul_(float(params["lambda"])).add_(base)


@register(
    "ties",
    needs_base=True,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"normalize": True, "lambda": 1.0},
)
def ties(tensors, base, weights, params, *, name, generator_seed) -> Tensor:
    """TIES: trim task vectors to top-density magnitude, elect signs by mass, disjoint mean, base + lambda*merge."""
    deltas = [magnitude_trim(t - base, float(d)) for t, d in zip(tensors, params["density"], strict=True)]
    merged = sign_consensus_merge(deltas, weights, bool(params["normalize"]))
    return merged.mul_(float(params["lambda"])).add_(base)


def _dare_deltas(tensors, base, params, name, seed) -> list[Tensor]:
    rescale = bool(params.get("rescale", True))
    return [
        dare_drop(t - base, float(d), tensor_generator(seed, name, i), rescale)
        for i, (t, d) in enumerate(zip(tensors, params["density"], strict=True))
    ]


@register(
    "dare_linear",
    needs_base=True,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"normalize": False, "lambda": 1.0, "rescale": True},
)
def dare_linear(tensors, base, weights, params, *, name, generator_seed) -> Tensor:
    """DARE: random drop (p = 1 - density) and rescale of task vectors, then task arithmetic."""
    deltas = _dare_deltas(tensors, base, params, name, generator_seed)
    merged = weighted_sum(deltas, weights, bool(params["normalize"]))
    return merged.mul_(float(params["lambda"])).add_(base)


@register(
    "dare_ties",
    needs_base=True,
    model_params={"weight": 1.0, "density": 1.0},
    global_params={"normalize": True, "lambda": 1.0, "rescale": True},
)
def dare_ties(tensors, base, weights, params, *, name, generator_seed) -> Tensor:
    """DARE drop and rescale of task vectors, then TIES sign election and disjoint merge."""
    deltas = _dare_deltas(tensors, base, params, name, generator_seed)
    merged = sign_consensus_merge(deltas, weights, bool(params["normalize"]))
    return merged.mul_(float(params["lambda"])).add_(base)


@register("slerp", needs_base=False, model_params={}, global_params={"t": 0.5, "eps": 5e-4}, n_models=2)
def slerp(tensors, base, weights, params, *, name, generator_seed) -> Tensor:
    """Spherical interpolation between two models at t (t=0: first model); lerp when nearly parallel."""
    v0, v1 = tensors
    t = float(params["t"])
    n0, n1 = v0.norm(), v1.norm()
    if n0 == 0 or n1 == 0:  # the angle is undefined: interpolate linearly
        return (1 - t) * v0 + t * v1
    cos = torch.clamp((v0.flatten() @ v1.flatten()) / (n0 * n1), -1.0, 1.0)
    if cos.abs() > 1.0 - float(params["eps"]):  # sin(theta) ~ 0 would blow up the slerp weights
        return (1 - t) * v0 + t * v1
    theta = torch.arccos(cos)
    sin_theta = torch.sin(theta)
    s0 = torch.sin((1 - t) * theta) / sin_theta
    s1 = torch.sin(t * theta) / sin_theta
    return s0 * v0 + s1 * v1
