"""Student training: trace set -> tokenised examples -> SFT (LoRA or full) -> optional contrastive DPO -> export.

    from reasonlite.train import train_student
    result = train_student(cfg, "runs/x/traces", "runs/x/train")   # exported model in result.export_dir

Output folder: `checkpoints/` (every train.save_steps; `resume=True` continues from the newest complete one, `fresh=True`
deletes them; with neither, existing checkpoints are an error rather than silently lost), `metrics.json`,
`loss.png`, `model/` (the exported student, see `train.export`). Every check on the input (empty trace set, a format
the traces cannot feed, max_length too short, unknown LoRA modules) runs before the first optimizer step.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from reasonlite.config import ReasonLiteConfig, StageView
from reasonlite.train.formats_data import TrainError, build_dataset, load_trace_set, trace_examples

__all__ = ["TrainError", "TrainResult", "export_student", "train_student", "update_model_card"]

STATE_FILE = "train_state.json"


@dataclass
class TrainResult:
    export_dir: Path
    steps: int
    train_seconds: float
    final_loss: float
    metrics: dict = field(default_factory=dict)


def _check_resume(cfg: StageView, out: Path, resume: bool, fresh: bool = False, write: bool = True) -> None:
    """Checkpoints may only be resumed by the config that wrote them; only `fresh` deletes them. `write=False` only
    checks (before the model is loaded, so a refusal costs nothing)."""
    ckpt_dir = out / "checkpoints"
    state_path = out / STATE_FILE
    want = cfg.hash()
    has_checkpoints = ckpt_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpt_dir.iterdir())
    if fresh:
        if ckpt_dir.exists() and write:
            shutil.rmtree(ckpt_dir)  # starting over: old checkpoints would otherwise be mixed with the new ones
    elif resume and ckpt_dir.exists() and state_path.exists():
        have = json.loads(state_path.read_text()).get("train_hash")
        if have != want:
            raise TrainError(f"--resume: the checkpoints in {ckpt_dir} were written by a different training config "
                             f"(train hash {have} != {want}); use --fresh to start over, or restore the config")
    elif not resume and has_checkpoints:
        raise TrainError(f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue from the newest "
                         "complete one, or --fresh to delete them and start over")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({"train_hash": want}))


def train_student(cfg: ReasonLiteConfig | StageView, trace_dir: str | Path, out_dir: str | Path, resume: bool = False,
                  adapter_only: bool = False, fresh: bool = False) -> TrainResult:
    """Train `cfg.student` on the trace set in `trace_dir`, write checkpoints/metrics/plot and export to out/model.
    Reads only the train stage's view of `cfg` (`config.STAGE_SECTIONS`): every knob it uses is in the train hash."""
    from transformers import set_seed

    from reasonlite.models import load_model
    from reasonlite.train.distributed import is_main_process
    from reasonlite.train.dpo import pair_rows, run_dpo
    from reasonlite.train.export import export_student
    from reasonlite.train.plots import plot_loss
    from reasonlite.train.sft import console, prepare_model, run_sft, write_metrics

    cfg = cfg.stage_view("train")
    out = Path(out_dir)
    trace_dir = Path(trace_dir)
    if adapter_only and not cfg.student.lora:
        raise TrainError("--adapter-only needs a LoRA student: set student.lora: true or export merged weights")
    trace_set = load_trace_set(trace_dir)
    _check_resume(cfg, out, resume, fresh, write=False)
    model, tokenizer = load_model(cfg.student.model)
    examples, report = trace_examples(cfg, list(trace_set.traces), tokenizer)
    dataset = build_dataset(cfg, examples, tokenizer)
    if cfg.contrastive.enabled:
        pair_rows(cfg, list(trace_set.pairs), tokenizer)  # fail now, not after SFT, when no pair is usable
    set_seed(cfg.train.seed)
    model = prepare_model(cfg, model)
    main = is_main_process()  # under `--nproc N` (train.distributed) only rank 0 writes files
    _check_resume(cfg, out, resume, fresh, write=main)
    dropped = f", dropped {report.dropped}" if report.dropped else ""
    if main:
        console.print(f"training {cfg.student.model} ({cfg.student.format}, {'LoRA' if cfg.student.lora else 'full'}) "
                      f"on {report.used}/{report.traces} traces -> {len(dataset)} rows{dropped}")

    sft = run_sft(cfg, model, tokenizer, dataset, out / "checkpoints", resume=resume)
    model, history = sft.model, list(sft.history)
    metrics: dict = {
        "format": cfg.student.format, "student": cfg.student.model, "lora": cfg.student.lora,
        "traces": report.traces, "traces_used": report.used, "dropped": report.dropped, "rows": len(dataset),
        "steps": sft.steps, "train_seconds": round(sft.train_seconds, 2), "final_loss": sft.final_loss,
        "tokens_per_second": round(sft.tokens_per_second, 1), "budget_conditioned": cfg.budget.condition_training,
    }
    final_loss, seconds, steps = sft.final_loss, sft.train_seconds, sft.steps
    if cfg.contrastive.enabled:
        dpo = run_dpo(cfg, model, tokenizer, list(trace_set.pairs), out / "contrastive")
        model = dpo.model
        offset = history[-1]["step"] if history else 0
        history += [{**h, "step": h["step"] + offset} for h in dpo.history]
        metrics["contrastive"] = {"pairs": dpo.pairs, "steps": dpo.steps, "train_seconds": round(dpo.train_seconds, 2),
                                  "final_loss": dpo.final_loss, "beta": cfg.contrastive.beta,
                                  "nll_weight": cfg.contrastive.nll_weight}
        seconds += dpo.train_seconds
    metrics["total_train_seconds"] = round(seconds, 2)
    if not main:
        return TrainResult(out / "model", steps, seconds, final_loss, metrics)
    write_metrics(out / "metrics.json", {**metrics, "loss_history": history})
    plot_loss(history, out / "loss.png")
    export_dir = export_student(model, tokenizer, cfg, out / "model", trace_dir=trace_dir, adapter_only=adapter_only,
                                train_metrics=metrics)
    console.print(f"[green]✓ student exported to {export_dir}[/green] ({steps} steps, {seconds:.0f}s, "
                  f"final loss {final_loss:.4f})")
    return TrainResult(export_dir, steps, seconds, final_loss, metrics)


def __getattr__(name: str):
    # export helpers without importing torch/peft at package import time
    if name in ("export_student", "update_model_card"):
        from reasonlite.train import export

        return getattr(export, name)
    raise AttributeError(name)
