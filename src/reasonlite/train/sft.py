"""Supervised fine-tuning of the student on its trace set: TRL's SFTTrainer + PEFT LoRA (or full fine-tuning).

The dataset is pre-tokenised by `formats_data` (labels already -100 on the prompt), which SFTTrainer uses as is.
step_by_step adds a per-row `loss_weight`; `WeightedSFTTrainer.compute_loss` applies it (see there for why the loss
is a per-example mean). `train.packing` drops padding: the batch's examples are concatenated into rows of at most
`train.max_length` tokens (`WeightedCollator`, TRL's padding-free layout) whose position_ids restart at 0 for every
example; with no attention_mask and no KV cache, transformers' mask builder
(`masking_utils.find_packed_sequence_indices`) turns those restarts into a block-diagonal causal mask for sdpa and
eager attention alike, so examples never attend to each other (tests/test_packing.py checks the logits).
Checkpoints land in `<out>/checkpoints` every `train.save_steps`; resuming hands the last one to HF Trainer, which
restores weights, optimizer, scheduler, RNG state and the position in the data order, so a killed run continues exactly where a straight run would be. HF writes a checkpoint file by file, so a kill during a
save leaves a half-written folder: `last_checkpoint` only returns a checkpoint whose files are all there and readable,
and removes newer incomplete ones with a one-line notice (save_total_limit=2 keeps the previous complete one).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from reasonlite.config import StageView
from reasonlite.train.formats_data import TrainError

console = Console()


# ---------------------------------------------------------------------------------------------- weighted loss
@dataclass
class WeightedCollator(DataCollatorForLanguageModeling):
    """TRL's padding collator, also carrying the per-row `loss_weight` column to `compute_loss`.

    With `padding_free` and a `pack_length`, the batch's examples are binned (first-fit decreasing) into rows of at
    most `pack_length` tokens instead of TRL's single row: sdpa on CPU computes the whole masked score matrix, so one
    row of B*L tokens costs (B*L)^2 attention where bins cost about rows * pack_length^2.
    """

    pack_length: int | None = None

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.padding_free and self.pack_length:
            return self._binned(examples)
        batch = super().torch_call(examples)
        if "loss_weight" in examples[0]:
            batch["loss_weight"] = torch.tensor([float(e["loss_weight"]) for e in examples])
        return batch

    def _binned(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
        bins: list[list[int]] = []
        for i in order:
            n = len(examples[i]["input_ids"])
            fit = next((b for b in bins if sum(len(examples[j]["input_ids"]) for j in b) + n <= self.pack_length), None)
            if fit is None:
                bins.append([i])
            else:
                fit.append(i)
        width = max(sum(len(examples[j]["input_ids"]) for j in b) for b in bins)
        ids = torch.full((len(bins), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(bins), width), -100, dtype=torch.long)
        # pads continue the last example's positions (no restart), so they never count as an example of their own
        positions = torch.arange(width).repeat(len(bins), 1)
        for row, members in enumerate(bins):
            at = 0
            for j in members:
                ex = examples[j]
                n = len(ex["input_ids"])
                ids[row, at:at + n] = torch.tensor(ex["input_ids"])
                labels[row, at:at + n] = torch.tensor(ex.get("labels", ex["input_ids"]))
                labels[row, at] = -100  # nothing predicts an example's first token (TRL does the same)
                positions[row, at:at + n] = torch.arange(n)
                at += n
            positions[row, at:] = torch.arange(n, n + width - at)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions,
                 "num_real_tokens": torch.tensor(sum(len(e["input_ids"]) for e in examples))}
        if "loss_weight" in examples[0]:  # in packed order, which is the order example_index counts them in
            batch["loss_weight"] = torch.tensor([float(examples[j]["loss_weight"]) for b in bins for j in b])
        return batch


def example_index(labels: torch.Tensor, position_ids: torch.Tensor | None, n_examples: int) -> torch.Tensor:
    """Which example each token belongs to: its row, or in a packed row the count of position restarts before it."""
    if position_ids is None or labels.size(0) == n_examples:
        return torch.arange(labels.size(0), device=labels.device)[:, None].expand_as(labels)
    starts = (position_ids == 0).long()
    # row-major over the (1, T) packed row; padding past the last example (pad_to_multiple_of) has labels -100 anyway
    return (starts.reshape(-1).cumsum(0) - 1).clamp(0, n_examples - 1).view_as(labels)


def weighted_example_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                          position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(2 / B) * sum_i w_i * mean_t CE(i, t) over each example's completion tokens (B = len(weights)).

    A packed batch (`train.packing`: one row, position_ids restarting per example) is split back into its examples
    by `example_index`, so packing leaves this loss unchanged.

    Why a per-example mean and not HF's token mean: distilling step-by-step's objective is
    alpha * L_label + (1 - alpha) * L_rationale with each task's loss averaged over its examples. A label target is
    ~6 tokens and a rationale ~60-100, so under a token mean the label task would get ~10% of the gradient at
    alpha = 0.5. Every trace contributes one row of each task, so the factor 2 makes alpha = 0.5 the plain
    per-example mean; the batch size B (not sum of weights) normalises, so alpha keeps its meaning even in a batch
    that happens to hold a single task.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_ce = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).float()
    n = weights.numel()
    owner = example_index(labels, position_ids, n)[:, 1:].reshape(-1)
    sums = torch.zeros(n, dtype=token_ce.dtype, device=token_ce.device).index_add_(0, owner, (token_ce * mask).reshape(-1))
    counts = torch.zeros(n, dtype=mask.dtype, device=mask.device).index_add_(0, owner, mask.reshape(-1))
    per_example = sums / counts.clamp(min=1)
    return 2.0 * (weights.to(per_example.dtype) * per_example).sum() / n


class ShuffledLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping with its batches in random order. Its sampler sorts each megabatch (50 batches)
    from the longest rows to the shortest, so every 50 steps run long -> short and a run whose last step ends a
    megabatch trains last on the shortest rows alone (session 14: a 300-step retail student that way dropped steps
    from its programs, 69% on its test split against 94% at 200 steps without grouping). transformers has no
    option to shuffle the batches, hence this subclass: the same length-homogeneous batches (the same padding
    saved), drawn in an order the seeded generator shuffles, so a resumed run replays it."""

    def __iter__(self):
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
        batches = [indices[i: i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        return iter([i for b in order for i in batches[b]])


class WeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss honours a `loss_weight` column (step_by_step).

    Unweighted rows use transformers' own causal-LM loss (token mean over the accumulated batch, exactly what TRL
    computes) instead of TRL's fused chunked log-prob kernel: that kernel saves GPU memory but made a CPU step
    several times slower here, and it also computes entropy/accuracy metrics we do not use.
    """

    def __init__(self, *args, weighted: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.weighted = weighted
        if weighted:
            # Our loss is a per-micro-batch mean, not a sum over `num_items_in_batch` tokens, so let Trainer divide it
            # by the gradient-accumulation steps as it does for models without loss kwargs.
            self.model_accepts_loss_kwargs = False

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:  # train.group_by_length: the same batches, in shuffled order
            return ShuffledLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, generator=sampler.generator)
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("loss_weight", None)
        real = inputs.pop("num_real_tokens", None)  # binned packed rows say how many of their tokens are not padding
        if model.training:  # real tokens: a padded batch's mask, a packed batch's count (a single row has no pads)
            mask = inputs.get("attention_mask")
            self._total_train_tokens += (int(real) if real is not None else int(mask.sum().item()) if mask is not None
                                         else inputs["input_ids"].numel())
        # use_cache=False also matters for packing: transformers only reads example boundaries from position_ids when
        # there is no cache (and no attention_mask); with a cache the packed examples would attend to each other.
        inputs["use_cache"] = False
        if weights is None:
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        loss = weighted_example_loss(outputs.logits, inputs["labels"], weights, inputs.get("position_ids"))
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------------------------------------- progress
class RichProgress(TrainerCallback):
    """One rich progress bar: step, loss, tokens/s, ETA. Keeps the loss history for metrics.json and loss.png."""

    def __init__(self, label: str = "train") -> None:
        self.label = label
        self.trainer: Any = None  # set after the trainer exists; it counts tokens seen
        self.history: list[dict] = []
        self._progress: Progress | None = None
        self._task = None
        self._t0 = 0.0
        self._tokens0 = 0
        self._loss = float("nan")

    def _tokens(self) -> int:
        return int(getattr(self.trainer, "_total_train_tokens", 0) or 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=state.max_steps, completed=state.global_step,
                                             loss=float("nan"), tps=0.0)
        self._t0, self._tokens0 = time.perf_counter(), self._tokens()

    def tokens_per_second(self) -> float:
        dt = time.perf_counter() - self._t0
        return (self._tokens() - self._tokens0) / dt if dt > 0 else 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])
            self.history.append({"step": state.global_step, "loss": self._loss,
                                 "learning_rate": float(logs.get("learning_rate", 0.0))})

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step, loss=self._loss,
                                  tps=self.tokens_per_second())

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step, loss=self._loss)
            self._progress.stop()
            self._progress = None


# ---------------------------------------------------------------------------------------------- model setup
def check_lora_targets(model, targets: list[str]) -> None:
    """Fail before training when a LoRA target module name matches nothing in the model."""
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                           if isinstance(mod, torch.nn.Linear) and "." in name})
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise TrainError(f"student.lora_target_modules: {missing} are not modules of {type(model).__name__}; "
                         f"choose among {linear_names}")


def prepare_model(cfg: StageView, model):
    """Wrap the base model in a seeded LoRA adapter (or leave it whole for full fine-tuning)."""
    if not cfg.student.lora:
        return model
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    check_lora_targets(model, cfg.student.lora_target_modules)
    set_seed(cfg.train.seed)  # LoRA's A matrices are random: seed them so reruns start identical
    lora = LoraConfig(r=cfg.student.lora_r, lora_alpha=cfg.student.lora_alpha, lora_dropout=cfg.student.lora_dropout,
                      target_modules=list(cfg.student.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def planned_steps(cfg: StageView, n_rows: int) -> int:
    """train.max_steps, capped at train.epochs_cap passes over the data (tiny trace sets would otherwise overfit)."""
    per_epoch = math.ceil(n_rows / (cfg.train.batch_size * cfg.train.grad_accum))
    return max(1, min(cfg.train.max_steps, cfg.train.epochs_cap * per_epoch))


def precision_kwargs() -> dict:
    """fp32 on CPU (no fp16/bf16 autocast there); bf16 on GPUs that have it."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16, "use_cpu": False}
    return {"bf16": False, "fp16": False, "use_cpu": True}


# ---------------------------------------------------------------------------------------------- SFT run
@dataclass
class SFTRun:
    model: Any  # trained model (PeftModel when LoRA)
    steps: int
    train_seconds: float
    final_loss: float
    tokens_per_second: float
    history: list[dict] = field(default_factory=list)


WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete, loadable HF Trainer checkpoint (None when it is).

    Checked without loading tensors: trainer_state.json parses (HF writes it last), the weights' safetensors header
    parses, and optimizer.pt / scheduler.pt are whole torch zip archives (CRC of every member)."""
    import zipfile

    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "trainer_state.json is truncated"
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).exists()]
    if not weights:
        return "no model or adapter weights"
    for w in weights:
        if w.suffix == ".safetensors":
            try:
                with w.open("rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    if n <= 0 or n > w.stat().st_size - 8:
                        return f"{w.name} is truncated"
                    json.loads(f.read(n))
            except (OSError, ValueError):
                return f"{w.name} is truncated"
    for name in ("optimizer.pt", "scheduler.pt"):
        path = folder / name
        if not path.exists():
            return f"no {name}"
        try:
            with zipfile.ZipFile(path) as z:
                if z.testzip() is not None:
                    return f"{name} is corrupt"
        except (OSError, zipfile.BadZipFile):
            return f"{name} is truncated"
    return None


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint in `ckpt_dir`; newer incomplete ones (a kill during a save) are removed, each
    with a one-line notice, so the resumed run can write its own checkpoint of that step."""
    import re
    import shutil

    if not ckpt_dir.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        console.print(f"[yellow]skipping incomplete {folder.name} ({problem}; interrupted save), removed[/yellow]")
        shutil.rmtree(folder, ignore_errors=True)
    return None


def run_sft(cfg: StageView, model, tokenizer, dataset, ckpt_dir: Path, resume: bool = False,
            callbacks: list[TrainerCallback] | None = None) -> SFTRun:
    """Train with SFTTrainer; with `resume`, continue from the newest checkpoint in `ckpt_dir` if there is one."""
    steps = planned_steps(cfg, len(dataset))
    weighted = "loss_weight" in dataset.column_names
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=steps,
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.learning_rate,
        warmup_steps=round(cfg.train.warmup_ratio * steps),
        lr_scheduler_type="linear",
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        max_length=cfg.train.max_length,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=2,  # two, so a kill during a save still leaves a complete one
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        gradient_checkpointing=False,  # small students fit; checkpointing would cost ~20% speed
        remove_unused_columns=False,  # keep loss_weight for the weighted loss
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        **precision_kwargs(),
    )
    progress = RichProgress("sft")
    # padding_free on our collator, not on SFTConfig: TRL refuses a custom collator when its own padding_free is set
    collator = WeightedCollator(pad_token_id=tokenizer.pad_token_id, padding_free=cfg.train.packing,
                                pack_length=cfg.train.max_length)
    datasets.disable_progress_bars()  # TRL's dataset preparation bars would interleave with ours
    trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 data_collator=collator, callbacks=[progress, *(callbacks or [])],
                                 weighted=weighted)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; RichProgress shows the same
    for callback in (progress, *(callbacks or [])):
        if hasattr(callback, "trainer"):  # callbacks that read the token counter (RichProgress, benchmarks)
            callback.trainer = trainer
    checkpoint = last_checkpoint(ckpt_dir) if resume else None
    if checkpoint:
        console.print(f"[cyan]resuming from {checkpoint}")
    elif resume and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        console.print(f"[yellow]no complete checkpoint in {ckpt_dir}; starting from step 0[/yellow]")
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    # Trainer's log history survives a resume (it is in the checkpoint), the callback's only covers this process.
    history = [{"step": h["step"], "loss": float(h["loss"]), "learning_rate": float(h.get("learning_rate", 0.0))}
               for h in trainer.state.log_history if "loss" in h]
    final_loss = history[-1]["loss"] if history else float(out.training_loss)
    return SFTRun(trainer.model, trainer.state.global_step, seconds, final_loss, progress.tokens_per_second(), history)


def write_metrics(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2))
