"""Contrastive rationale training: a DPO stage on (chosen, rejected) rationale pairs after SFT.

The loss is DPO plus an NLL term on the chosen rationale, as in iterative RPO (Pang et al. 2024): TRL's
`loss_type=["sigmoid", "sft"]` with `loss_weights=[1, contrastive.nll_weight]`. The NLL term keeps the likelihood of
correct rationales from falling while the margin to wrong ones grows (plain DPO on reasoning tends to push both down).

The reference policy is the SFT student itself: with LoRA, TRL copies the trained adapter into a frozen "ref"
adapter (removed again afterwards, so exports carry one adapter); with full fine-tuning, a frozen deep copy.
Prompts are built with `formats.build_messages` in the student's format, exactly as in SFT, and completions with
`formats.build_target`, so the pairs are in the distribution the student was trained and will be asked on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from transformers.trainer_callback import PrinterCallback

from reasonlite.budget import budget_bucket
from reasonlite.config import StageView
from reasonlite.formats import build_messages, ensure_answer_sentence
from reasonlite.train.formats_data import TrainError, end_of_turn
from reasonlite.train.sft import RichProgress, console, precision_kwargs

# student format -> pair style it can learn from
_PAIR_STYLE = {"pal": "pal", "cot": "cot", "step_by_step": "step_by_step"}


def _completion(fmt: str, text: str, answer: str | None) -> str:
    if fmt == "pal":
        return text.strip()
    return ensure_answer_sentence(text, answer) if answer else text.strip()


def pair_rows(cfg: StageView, pairs: list[Any], tokenizer) -> list[dict]:
    """prompt/chosen/rejected text rows (prompt = the chat-templated student prompt) for the student's format."""
    fmt = cfg.student.format
    if fmt not in _PAIR_STYLE:
        raise TrainError(f"contrastive.enabled needs a rationale format, but student.format is '{fmt}': set "
                         "student.format to pal, cot or step_by_step, or contrastive.enabled: false")
    rows = []
    for pair in pairs:
        style = getattr(pair, "style", fmt)
        if style != _PAIR_STYLE[fmt] and not (fmt == "step_by_step" and style == "cot"):
            continue
        if not pair.chosen or not pair.rejected:
            continue
        chosen = _completion(fmt, pair.chosen, getattr(pair, "chosen_answer", None))
        rejected = _completion(fmt, pair.rejected, getattr(pair, "rejected_answer", None))
        budget = None
        if cfg.budget.condition_training:
            budget = budget_bucket(len(tokenizer(chosen, add_special_tokens=False)["input_ids"]), cfg.budget.buckets)
        task = "rationale" if fmt == "step_by_step" else None
        messages = build_messages(pair.question, fmt, budget=budget, task=task)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        eot = end_of_turn(tokenizer)
        rows.append({"prompt": prompt, "chosen": chosen + eot, "rejected": rejected + eot})
    if not rows:
        raise TrainError(f"contrastive.enabled but the trace set has no usable {fmt} pairs (of {len(pairs)}): keep "
                         "traces.counterfactual_negatives: true or use teacher samples k > 1 "
                         "(traces.self_consistency.k), or set contrastive.enabled: false")
    return rows


@dataclass
class DPORun:
    model: Any
    steps: int
    train_seconds: float
    final_loss: float
    pairs: int
    history: list[dict] = field(default_factory=list)


def run_dpo(cfg: StageView, model, tokenizer, pairs: list[Any], out_dir) -> DPORun:
    """One DPO(+NLL) stage on the SFT student; returns the updated model (same adapter when LoRA)."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    rows = pair_rows(cfg, pairs, tokenizer)
    c = cfg.contrastive
    loss_type, weights = (["sigmoid", "sft"], [1.0, c.nll_weight]) if c.nll_weight > 0 else (["sigmoid"], [1.0])
    args = DPOConfig(
        output_dir=str(out_dir),
        max_steps=c.max_steps,
        per_device_train_batch_size=c.batch_size,
        learning_rate=c.learning_rate,
        beta=c.beta,
        loss_type=loss_type,
        loss_weights=weights,
        max_length=cfg.train.max_length,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        lr_scheduler_type="linear",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        **precision_kwargs(),
    )
    is_peft = isinstance(model, PeftModel)
    if is_peft:
        model.train()
        for name, param in model.named_parameters():  # the SFT adapter keeps training
            param.requires_grad = "lora_" in name
    # LoRA: TRL adds a frozen copy of the adapter as the reference. Full FT: TRL would reload the *base* weights
    # from the config path, which is the pre-SFT model, so hand it a frozen copy of the SFT student instead.
    ref_model = None if is_peft else copy.deepcopy(model).eval()
    progress = RichProgress("contrastive")
    import datasets

    datasets.disable_progress_bars()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[progress])
    trainer.remove_callback(PrinterCallback)
    console.print(f"contrastive stage: {len(rows)} pairs, beta={c.beta}, nll_weight={c.nll_weight}")
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trained = trainer.model
    if is_peft and "ref" in trained.peft_config:
        trained.delete_adapter("ref")
        trained.set_adapter("default")
    history = [{"step": h["step"], "loss": float(h["loss"]), "stage": "contrastive"}
               for h in trainer.state.log_history if "loss" in h]
    final = history[-1]["loss"] if history else float("nan")
    return DPORun(trained, trainer.state.global_step, seconds, final, len(rows), history)
