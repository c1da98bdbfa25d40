"""LoRA adapters: fold them into their base weights, or combine several adapters of one base.

A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) holds, per target module, factors A (r x in)
and B (out x r); the module's weight becomes W + scale * B @ A with scale = alpha / r (alpha / sqrt(r) with
rsLoRA), transposed for `fan_in_fan_out` (GPT-2 style Conv1D) and for embeddings.

peft does this in memory (`PeftModel.from_pretrained(base).merge_and_unload()`, `add_weighted_adapter(...)`): that
needs the whole base model loaded. The path here streams instead: an adapter opens as a checkpoint whose tensors are
`base tensor + delta`, read one at a time (`AdapterCheckpoint`), so the streaming merge driver folds adapters in and
merges adapted models with bounded memory. `merge_adapter_in_memory` keeps peft's path for small models and as the
reference the tests check against.

Model references use mergekit's `BASE+ADAPTER` syntax when the adapter does not name a base that resolves here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from slm_fusion.merging.config import MergeConfig
from slm_fusion.merging.driver import Checkpoint, MergeError, MergeReport, resolve_model_ref, run_merge

_PREFIX = "base_model.model."
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_[AB])$")


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling of B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank/alpha_pattern lookup: a key matches a module name ending in it (after a dot or at the start)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraFactors:
    A: torch.Tensor  # (r, in)  — for embeddings (r, num_embeddings)
    B: torch.Tensor  # (out, r) — for embeddings (dim, r)
    scale: float
    transpose: bool  # fan_in_fan_out layers and embeddings store the weight transposed w.r.t. B @ A
    embedding: bool = False  # saved as lora_embedding_A/B rather than lora_A/B.weight

    def delta(self) -> torch.Tensor:
        product = self.B.float() @ self.A.float()
        return (product.T if self.transpose else product) * self.scale


@dataclass
class LoraAdapter:
    """An adapter folder read into memory (adapters are small): factors per weight name and full replacements."""

    folder: Path
    config: dict[str, Any]
    factors: dict[str, LoraFactors]  # keyed by the base weight name, e.g. model.layers.0.self_attn.q_proj.weight
    replacements: dict[str, torch.Tensor]  # modules_to_save: whole tensors that replace the base's

    @property
    def base_ref(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def delta(self, weight_name: str) -> torch.Tensor | None:
        factors = self.factors.get(weight_name)
        return factors.delta() if factors is not None else None


def load_adapter(folder: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder; refuse variants whose merge is not W + scale * B @ A."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{folder}: peft_type={config.get('peft_type')}; only LoRA adapters can be merged here")
    if config.get("use_dora"):
        raise MergeError(
            f"{folder}: DoRA adapters rescale weight columns by a learned magnitude; merge them with peft "
            "(`merge_adapter_in_memory`) instead of the streaming path"
        )
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.exists():
        raise MergeError(f"{folder}: no adapter_model.safetensors; save the adapter with safe_serialization=True")
    raw = load_file(weights_file)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    embedding_modules: set[str] = set()
    for key, tensor in raw.items():
        name = key.removeprefix(_PREFIX)
        match = _FACTOR_RE.match(name)
        if match:
            module = match.group("module") or match.group("emodule")
            kind = (match.group("kind") or match.group("ekind"))[-1]  # "A" or "B"
            if match.group("emodule"):
                embedding_modules.add(module)
            halves.setdefault(module, {})[kind] = tensor
        elif ".lora_" in name:
            raise MergeError(f"{folder}: unsupported LoRA tensor '{key}' (only lora_A/lora_B and embedding factors)")
        else:  # modules_to_save copies (and base layers peft saves for tied embeddings) replace the base tensor
            replacements[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = tensor
    alpha, use_rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    factors = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise MergeError(f"{folder}: module '{module}' has only lora_{''.join(pair)}; the adapter file is incomplete")
        r = pair["A"].shape[0]  # the saved rank, which already honours rank_pattern
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        embedding = module in embedding_modules
        factors[f"{module}.weight"] = LoraFactors(
            A=pair["A"],
            B=pair["B"],
            scale=lora_scale(module_alpha, r, use_rslora),
            transpose=embedding or fan_in_fan_out,
            embedding=embedding,
        )
    return LoraAdapter(folder=folder, config=config, factors=factors, replacements=replacements)


def split_ref(ref: str | Path) -> tuple[str | None, str]:
    """'BASE+ADAPTER' -> (BASE, ADAPTER); a plain reference -> (None, ref)."""
    text = str(ref)
    if Path(text).expanduser().exists() or "+" not in text:
        return None, text
    base, adapter = text.rsplit("+", 1)
    return base, adapter


class AdapterCheckpoint:
    """A base checkpoint seen through a LoRA adapter: `get(name)` returns base + delta, computed on demand.

    Same interface as `driver.Checkpoint` (names, config, meta, has, get, close), so the driver streams it like any
    other model. Patched tensors come back in float32 so the delta is not rounded before merging.
    """

    def __init__(self, adapter_dir: str | Path, label: str | None = None, base: str | Path | None = None):
        self.adapter = load_adapter(adapter_dir)
        base_ref = base or self.adapter.base_ref
        if not base_ref:
            raise MergeError(
                f"adapter {adapter_dir} does not name its base (base_model_name_or_path is empty): "
                "reference it as `BASE+ADAPTER` in the merge config, or pass base="
            )
        self.base = Checkpoint(resolve_model_ref(base_ref), label=f"{base_ref} (base of {adapter_dir})")
        self.folder = self.base.folder
        self.label = label or f"{base_ref}+{adapter_dir}"
        adapter_folder = Path(adapter_dir)
        self.tokenizer_dir = adapter_folder if (adapter_folder / "tokenizer.json").exists() else self.base.folder
        self.config = dict(self.base.config)
        extra = [n for n in self.adapter.replacements if n not in self.base.names]
        if "lm_head.weight" in extra:  # a trained head (modules_to_save) unties it from the embeddings
            self.config["tie_word_embeddings"] = False
        self.names = list(self.base.names) + extra
        unknown = [n for n in self.adapter.factors if not self.base.has(n)]
        if unknown:
            raise MergeError(
                f"adapter {adapter_dir} targets {unknown[:3]} which base {base_ref} does not have; "
                "pair the adapter with the base it was trained on"
            )

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def has(self, name: str) -> bool:
        return name in self.adapter.replacements or self.base.has(name)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name in self.adapter.replacements:
            tensor = self.adapter.replacements[name]
            return tensor.dtype, tuple(tensor.shape)
        return self.base.meta(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self.adapter.replacements:
            return self.adapter.replacements[name].clone()
        source = self.base._source(name) or name  # a tied head reads the (adapted) embedding
        delta = self.adapter.delta(source)
        weight = self.base.get(name)
        if delta is None:
            return weight
        return weight.float() + delta

    def close(self) -> None:
        self.base.close()


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    dtype: str = "float32",
    show_progress: bool = True,
) -> MergeReport:
    """Fold one adapter into its base and write a full HF model folder, streaming tensor by tensor."""
    ref = f"{base}+{adapter_dir}" if base else str(adapter_dir)
    config = MergeConfig(merge_method="linear", models=[{"model": ref}], dtype=dtype)
    return run_merge(config, out_dir, show_progress=show_progress)


def combine_adapters(
    adapter_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    weights: list[float] | None = None,
    method: Literal["linear", "ties", "concat"] = "linear",
    density: float = 1.0,
    base: str | Path | None = None,
    output: Literal["model", "adapter"] = "model",
    dtype: str = "float32",
    show_progress: bool = True,
) -> MergeReport | Path:
    """Combine adapters of one base: W + sum_i w_i delta_i (linear), TIES over the deltas, or concatenated factors.

    output="model" streams a merged HF folder (linear and concat give the same weights; ties trims/elects signs on
    the materialised deltas). output="adapter" writes a new adapter whose factors are the inputs' stacked along the
    rank — exact for linear combinations, so it is what linear/concat produce; TIES has no low-rank form.
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapter_dirs)
    if len(weights) != len(adapter_dirs):
        raise MergeError(f"weights: {len(weights)} values for {len(adapter_dirs)} adapters")
    if output == "adapter":
        if method == "ties":
            raise MergeError("method='ties' has no exact low-rank form: use output='model', or method='concat'")
        return concat_adapters(adapter_dirs, out_dir, weights=weights)
    adapters = [load_adapter(d) for d in adapter_dirs]
    base_ref = str(base) if base else adapters[0].base_ref
    if not base_ref:
        raise MergeError("the adapters do not name their base (base_model_name_or_path); pass base=")
    models = [
        {"model": f"{base_ref}+{d}", "parameters": {"weight": w, **({"density": density} if method == "ties" else {})}}
        for d, w in zip(adapter_dirs, weights)
    ]
    # Task vectors against the base are exactly the adapters' deltas (up to float32 rounding of W + delta - W).
    merge_method = "ties" if method == "ties" else "task_arithmetic"
    config = MergeConfig(merge_method=merge_method, base_model=base_ref, models=models, dtype=dtype)
    return run_merge(config, out_dir, show_progress=show_progress)


def concat_adapters(adapter_dirs: list[str | Path], out_dir: str | Path, *, weights: list[float]) -> Path:
    """A new adapter whose delta is sum_i w_i * delta_i: factors stacked along the rank, scales folded in.

    Each input contributes c_i = w_i * scale_i; A_i gets sign(c_i) * sqrt(|c_i|) and B_i gets sqrt(|c_i|), so
    B_cat @ A_cat = sum_i c_i B_i @ A_i exactly and both factors keep comparable magnitudes. The new adapter has
    lora_alpha = r (scale 1).
    """
    adapters = [load_adapter(d) for d in adapter_dirs]
    modules = set(adapters[0].factors)
    for adapter in adapters[1:]:
        if set(adapter.factors) != modules:
            missing = sorted(modules ^ set(adapter.factors))[:3]
            raise MergeError(
                f"{adapter.folder} targets different modules (e.g. {missing}); concatenation needs adapters with the "
                "same target_modules — use output='model' to merge adapters with different targets"
            )
        if adapter.replacements:
            raise MergeError(f"{adapter.folder} has modules_to_save tensors; they have no low-rank form, use output='model'")
    if adapters[0].replacements:
        raise MergeError(f"{adapters[0].folder} has modules_to_save tensors; they have no low-rank form, use output='model'")
    fan = {a.config.get("fan_in_fan_out", False) for a in adapters}
    if len(fan) > 1:
        raise MergeError("the adapters disagree on fan_in_fan_out; they were trained on different base layouts")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for weight_name in sorted(modules):
        module = weight_name.removesuffix(".weight")
        embedding = adapters[0].factors[weight_name].embedding
        stacked_a, stacked_b = [], []
        for adapter, w in zip(adapters, weights):
            f = adapter.factors[weight_name]
            c = w * f.scale
            root = math.sqrt(abs(c))
            stacked_a.append(f.A.float() * (math.copysign(root, c) if c else 0.0))
            stacked_b.append(f.B.float() * root)
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{_PREFIX}{module}.{a_key}"] = torch.cat(stacked_a, dim=0).contiguous()
        tensors[f"{_PREFIX}{module}.{b_key}"] = torch.cat(stacked_b, dim=1).contiguous()
        ranks[module] = sum(a.factors[weight_name].A.shape[0] for a in adapters)

    rank = max(ranks.values())
    config = dict(adapters[0].config)
    config.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        # modules whose summed rank differs from r get their own rank and alpha (alpha = rank keeps scale 1)
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    lines = ["# Combined LoRA adapter (SLM-Fusion, concat)", "", "Inputs (weight):"]
    lines += [f"- `{d}` ({w})" for d, w in zip(adapter_dirs, weights)]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return out


def merge_adapter_in_memory(adapter_dir: str | Path, out_dir: str | Path, *, base: str | Path | None = None) -> Path:
    """peft's own path: load the base, apply the adapter, `merge_and_unload()`, save. Needs the model in memory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = load_adapter(adapter_dir)
    base_ref = base or adapter.base_ref
    if not base_ref:
        raise MergeError(f"adapter {adapter_dir} does not name its base; pass base=")
    base_dir = resolve_model_ref(base_ref)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    return out
