"""The merge config: a YAML file in the spirit of mergekit, validated by pydantic.

```yaml
merge_method: ties
base_model: runs/base/model          # a HF folder or a reasonlite alias (smollm2-135m-instruct, ...)
models:
  - model: runs/a/model
    parameters: {weight: 0.5, density: 0.6}
  - model: runs/b/model
    parameters: {weight: 0.5, density: [0.3, 0.7]}   # a gradient across layers
parameters: {normalize: true, lambda: 1.0}
dtype: float32
tokenizer_source: base
seed: 0
```

A parameter value is a number/bool, a gradient (list of numbers interpolated across layers) or a list of rules
`{filter: <substring of the tensor name>, value: ...}` where the first match wins (see `methods.resolve_param`).
Global `parameters` may also hold per-model parameters (e.g. `density`): they are the default for every model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slm_fusion.merging.methods import MERGE_METHODS


class ParamRule(BaseModel):
    """One `{filter, value}` rule: applies to tensors whose name contains `filter` (no filter: every tensor)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = Field(None, description="substring of the tensor name, e.g. 'self_attn' or 'mlp'")
    value: bool | float | list[float] = Field(..., description="a number or a gradient across layers")


ParamValue = bool | float | str | list[float] | list[ParamRule]


def _plain(value: Any) -> Any:
    """Rules back to dicts so `resolve_param` works on plain data."""
    if isinstance(value, list):
        return [v.model_dump() if isinstance(v, ParamRule) else v for v in value]
    return value


class TaskSet(BaseModel):
    """The task an input model is a specialist for: what `slm-fusion merge-eval` scores it (and the merge) on."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(..., description="retail_math, gsm8k, or a JSONL/CSV path (as `reasonlite eval --data`)")
    format: Literal["answer", "cot", "pal", "step_by_step"] | None = Field(
        None, description="how the model answers; default: the student's reasonlite.json, else cot")
    limit: int | None = Field(None, ge=1, description="questions per split (default: all)")
    budget: int | None = Field(None, ge=2, description="reasoning-token cap with budget forcing (default: none)")
    dev: str | None = Field(None, description="tuning questions for `slm-fusion merge-tune` (default: retail_math / "
                            "gsm8k draw their own, never test questions; a file task needs one)")


class InputModel(BaseModel):
    """One model to merge and its per-model parameters (weight, density, ...)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., description="a HF folder (config.json + *.safetensors), a LoRA adapter folder or an alias")
    parameters: dict[str, ParamValue] = Field(default_factory=dict, description="per-model parameters")
    eval: TaskSet | None = Field(None, description="this specialist's task set, used by `slm-fusion merge-eval`")

    def plain_parameters(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.parameters.items()}


class MergeConfig(BaseModel):
    """A whole merge: method, inputs, parameters, output dtype, tokenizer source and seed."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str = Field(..., description=f"one of: {', '.join(sorted(MERGE_METHODS))}")
    base_model: str | None = Field(None, description="the model task vectors are taken against (HF folder or alias)")
    models: list[InputModel] = Field(..., min_length=1, description="the models to merge")
    parameters: dict[str, ParamValue] = Field(default_factory=dict, description="global method parameters")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float32", description="dtype of the merged weights")
    tokenizer_source: str = Field("base", description="'base', a model index (0, 1, ...) or a folder path")
    seed: int = Field(0, description="seed of the randomised methods (DARE)")
    max_shard_size: int | str = Field("2GB", description="largest output shard, bytes or '500MB' / '2GB'")

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _index_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # YAML `0` is an int

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            raise ValueError(f"unknown merge_method '{value}'; use one of: {', '.join(sorted(MERGE_METHODS))}")
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: int | str) -> int | str:
        if parse_size(value) <= 0:
            raise ValueError("max_shard_size must be positive, e.g. 2GB")
        return value

    @model_validator(mode="after")
    def _fits_method(self) -> MergeConfig:
        method = MERGE_METHODS[self.merge_method]
        if method.needs_base and not self.base_model:
            raise ValueError(f"merge_method '{method.name}' needs `base_model` (the model the task vectors start from)")
        if method.n_models is not None and len(self.models) != method.n_models:
            raise ValueError(
                f"merge_method '{method.name}' merges exactly {method.n_models} models; `models` lists {len(self.models)}"
            )
        allowed_global = set(method.global_params) | set(method.model_params)
        unknown = set(self.parameters) - allowed_global
        if unknown:
            raise ValueError(
                f"parameters: {sorted(unknown)} not used by '{method.name}'; it accepts {sorted(allowed_global)}"
            )
        for i, entry in enumerate(self.models):
            unknown = set(entry.parameters) - set(method.model_params)
            if unknown:
                raise ValueError(
                    f"models[{i}].parameters: {sorted(unknown)} not per-model for '{method.name}'; "
                    f"per-model parameters are {sorted(method.model_params)} (put global ones under `parameters`)"
                )
            density = entry.parameters.get("density", self.parameters.get("density"))
            for value in _numbers(density):
                if not 0.0 < value <= 1.0:
                    raise ValueError(f"models[{i}].parameters.density={value}: must be in (0, 1] (fraction kept)")
        for value in _numbers(self.parameters.get("t")):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"parameters.t={value}: must be in [0, 1] (0 = first model, 1 = second)")
        if self.tokenizer_source == "base" and not self.base_model:
            self.tokenizer_source = "0"  # no base: the first model's tokenizer is the natural default
        if self.tokenizer_source.isdigit() and int(self.tokenizer_source) >= len(self.models):
            raise ValueError(f"tokenizer_source={self.tokenizer_source}: only {len(self.models)} models are listed")
        return self

    def model_parameters(self, index: int) -> dict[str, Any]:
        """Per-model parameters of model `index`, with global values and method defaults filled in."""
        method = MERGE_METHODS[self.merge_method]
        merged = dict(method.model_params)
        merged.update({k: _plain(v) for k, v in self.parameters.items() if k in method.model_params})
        merged.update(self.models[index].plain_parameters())
        return merged

    def global_parameters(self) -> dict[str, Any]:
        method = MERGE_METHODS[self.merge_method]
        merged = dict(method.global_params)
        merged.update({k: _plain(v) for k, v in self.parameters.items() if k in method.global_params})
        return merged


def _numbers(value: Any) -> list[float]:
    """Every number a parameter may take (through gradients and rules), for range checks."""
    if value is None or isinstance(value, (bool, str)):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, ParamRule):
        return _numbers(value.value)
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def parse_size(value: int | str) -> int:
    """'2GB' / '500MB' / '1.5GiB' / 1234 -> bytes."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace("IB", "B")
    for suffix, scale in (("KB", 1 << 10), ("MB", 1 << 20), ("GB", 1 << 30), ("TB", 1 << 40), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(float(text))


class MergeConfigError(ValueError):
    """A merge config that does not validate; the message names each bad field."""


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML; errors list `field.path: problem` lines."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise MergeConfigError(f"{path}: a merge config is a YAML mapping with merge_method, models, ...")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        from reasonlite.config import format_validation_error

        raise MergeConfigError(format_validation_error(err, f"merge config {path}", schema=MergeConfig,
                                                       listing="see examples/merge.yaml")) from None
