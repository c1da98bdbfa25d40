"""Export the trained student as a folder `reasonlite.models.load_model` (and any HF tool) can load.

Merged (default): LoRA folded into the weights with `merge_and_unload`, safetensors, tokenizer with its chat template,
and a generation config whose eos is the chat template's end-of-turn token (so `generate` stops where training put
the eos). `adapter_only`: the LoRA adapter folder instead, its `base_model_name_or_path` being the student as named in
the config (an alias such as `smollm2-135m-instruct`, resolved by `load_model`).

Beside the weights: `reasonlite.json` (format, base model, budget conditioning: what the inference engine needs to
prompt the student the way it was trained) and a model card README.md, whose evaluation section
`update_model_card` fills in once eval has run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from reasonlite.config import ReasonLiteConfig, StageView
from reasonlite.train.formats_data import TrainError

STUDENT_META = "reasonlite.json"
EVAL_HEADER = "## Evaluation"


def manifest_hash(trace_dir: Path | None) -> str | None:
    """sha256 (16 hex) of the trace set's manifest.json: which exact trace set this student saw."""
    if trace_dir is None or not (Path(trace_dir) / "manifest.json").exists():
        return None
    return hashlib.sha256((Path(trace_dir) / "manifest.json").read_bytes()).hexdigest()[:16]


def student_meta(cfg: StageView, trace_dir: Path | None = None, extra: dict | None = None) -> dict:
    meta = {
        "format": cfg.student.format,
        "base_model": cfg.student.model,
        "budget_conditioned": cfg.budget.condition_training,
        "budget_buckets": list(cfg.budget.buckets),
        "lora": cfg.student.lora,
        "contrastive": cfg.contrastive.enabled,
        "trace_manifest_sha256": manifest_hash(trace_dir),
    }
    meta.update(extra or {})
    return meta


def _eval_section(metrics: dict | None) -> str:
    if not metrics:
        return f"{EVAL_HEADER}\n\nNot evaluated yet (`reasonlite eval` fills this in).\n"
    return f"{EVAL_HEADER}\n\n```json\n{json.dumps(metrics, indent=2, default=str)}\n```\n"


def write_model_card(out: Path, cfg: StageView, meta: dict, train_metrics: dict | None = None,
                     eval_metrics: dict | None = None) -> Path:
    card = [
        "---",
        "library_name: transformers",
        "tags: [reasonlite, distillation, reasoning]",
        f"base_model: {meta['base_model']}",
        "---",
        f"# ReasonLite student: {cfg.name}",
        "",
        f"Distilled from a `{cfg.teacher.kind}` teacher into `{meta['base_model']}` with ReasonLite.",
        "",
        (f"- **student format**: `{meta['format']}` (prompt it with `reasonlite.formats.build_messages(question, "
         f"'{meta['format']}')`; `reasonlite.infer.Student` reads `{STUDENT_META}` and does this for you)"),
        f"- **budget-conditioned**: {meta['budget_conditioned']}",
        f"- **trace set manifest sha256**: `{meta.get('trace_manifest_sha256')}`",
        f"- **export**: {'LoRA adapter' if meta.get('adapter_only') else 'merged weights'}",
        "",
        "## Training",
        "",
        f"```json\n{json.dumps(train_metrics or {}, indent=2, default=str)}\n```",
        "",
        "## Config",
        "",
        f"```yaml\n{cfg.dump()}```",  # the train stage's view: what this student was trained from
        "",
        _eval_section(eval_metrics),
    ]
    path = out / "README.md"
    path.write_text("\n".join(card))
    return path


def update_model_card(export_dir: str | Path, metrics: dict) -> Path:
    """Replace the card's evaluation section with `metrics` (called after eval)."""
    path = Path(export_dir) / "README.md"
    text = path.read_text() if path.exists() else f"# ReasonLite student\n\n{EVAL_HEADER}\n"
    head = text.split(EVAL_HEADER, 1)[0]
    path.write_text(head + _eval_section(metrics))
    meta_path = Path(export_dir) / STUDENT_META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta["eval"] = metrics
        meta_path.write_text(json.dumps(meta, indent=2, default=str))
    return path


def _generation_config(model, tokenizer):
    gen = model.generation_config
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    gen.eos_token_id = eot
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    return gen


def export_student(model: Any, tokenizer, cfg: ReasonLiteConfig | StageView, out: str | Path,
                   trace_dir: Path | None = None, adapter_only: bool = False,
                   train_metrics: dict | None = None) -> Path:
    """Write the student to `out` (merged HF folder, or the LoRA adapter with `adapter_only`); returns `out`. Reads
    only the train stage's view of `cfg`."""
    from peft import PeftModel

    cfg = cfg.stage_view("train")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    is_peft = isinstance(model, PeftModel)
    if adapter_only:
        if not is_peft:
            raise TrainError("export adapter_only needs a LoRA student: set student.lora: true or drop --adapter-only")
        for peft_cfg in model.peft_config.values():
            # As named in the config (alias or path): load_model resolves aliases, the hub is never asked.
            peft_cfg.base_model_name_or_path = cfg.student.model
        model.save_pretrained(out, safe_serialization=True)
        _generation_config(model, tokenizer).save_pretrained(out)
    else:
        merged = model.merge_and_unload() if is_peft else model
        merged.generation_config = _generation_config(merged, tokenizer)
        merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = student_meta(cfg, trace_dir, {"adapter_only": adapter_only})
    (out / STUDENT_META).write_text(json.dumps(meta, indent=2))
    write_model_card(out, cfg, meta, train_metrics)
    return out
