"""How a trace set becomes tokenised training examples for the student.

Every example is `prompt` (the student's chat template applied to `formats.build_messages`, with the generation
prompt) followed by `completion` (`formats.build_target` + the template's end-of-turn token). Prompt and completion
are tokenised separately and concatenated, so the loss mask is exact: labels are -100 on every prompt token and equal
to the input ids on every completion token. The inference engine feeds the same prompt ids and stops at the same
end-of-turn token, so what is trained is exactly what is asked for.

Formats (see `reasonlite.formats`): answer, cot, pal, and step_by_step (two rows per trace, the [label] task weighted
by `train.step_by_step_alpha` and the [rationale] task by 1 - alpha; the weights travel in a `loss_weight` column).
With `budget.condition_training`, rationale rows state "Use at most N tokens." where N is the trace's own length
bucket, so at inference a stated budget means something the student has seen. `budget.compress` (cot) adds, per trace,
the rationale's compressed form (`calculator.compress_rationale`: its equations, single-use results inlined) at that
form's own, smaller bucket, plus the full rationale without any stated budget: the student learns to write it out
when no budget is stated or the budget is generous, and to write the arithmetic alone when the budget is tight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reasonlite.budget import budget_bucket
from reasonlite.config import StageView
from reasonlite.formats import build_messages, build_target
from reasonlite.traces import TraceSet


class TrainError(ValueError):
    """Training cannot start with this config / trace set; the message names the knob to change."""


# ---------------------------------------------------------------------------------------------- trace-set loading
def load_trace_set(trace_dir: str | Path) -> TraceSet:
    """The trace set in `trace_dir` (`.traces`, `.pairs`, `.manifest`, `.path`), or a TrainError saying how to get one."""
    folder = Path(trace_dir)
    if not (folder / "traces.jsonl").exists() or not (folder / "manifest.json").exists():
        err = TrainError(f"no trace set at {folder} (traces.jsonl / manifest.json missing): run `reasonlite traces "
                         "CONFIG` first or pass --traces pointing at a trace-set folder")
        err.exit_code = 3  # data not found (reasonlite.cli_boundary)
        raise err
    return TraceSet.load(folder)


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class TextExample:
    """One training row before tokenisation."""

    messages: list[dict]
    target: str
    loss_weight: float = 1.0
    task: str | None = None
    trace_id: str = ""


@dataclass
class BuildReport:
    """What happened to the trace set on its way to training rows."""

    traces: int = 0
    used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


_NEEDS = {"pal": "program", "cot": "rationale", "step_by_step": "rationale"}


def _label(trace: Any) -> str | None:
    return getattr(trace, "label", None) or getattr(trace, "answer", None)


def trace_examples(cfg: StageView, traces: list[Any], tokenizer=None) -> tuple[list[TextExample], BuildReport]:
    """Turn traces into text rows for `cfg.student.format`; traces missing what the format needs are dropped.

    Raises TrainError when nothing is left, naming the knob (student.format / traces.style) to change.
    """
    fmt = cfg.student.format
    report = BuildReport(traces=len(traces))
    if not traces:
        raise TrainError("the trace set is empty: no trace passed verification/selection. Check the teacher "
                         "(teacher.*), loosen traces.self_consistency.min_agreement or budget.max_trace_tokens")
    condition = cfg.budget.condition_training
    alpha = cfg.train.step_by_step_alpha
    out: list[TextExample] = []
    for trace in traces:
        label = _label(trace)
        needed = _NEEDS.get(fmt)
        if label is None and fmt != "pal":
            report.drop("no label")
            continue
        if needed and not getattr(trace, needed, None):
            report.drop(f"no {needed}")
            continue
        rationale_target = None
        if fmt != "answer":
            task = "rationale" if fmt == "step_by_step" else None
            rationale_target = build_target(fmt, answer=label or "", rationale=getattr(trace, "rationale", None),
                                            program=getattr(trace, "program", None), task=task)
        budget = None
        if condition and rationale_target is not None:
            n_tokens = getattr(trace, "tokens", None)
            if n_tokens is None:
                if tokenizer is None:
                    raise TrainError("budget.condition_training needs trace token counts; pass the student tokenizer")
                n_tokens = len(tokenizer(rationale_target, add_special_tokens=False)["input_ids"])
            budget = budget_bucket(int(n_tokens), cfg.budget.buckets)
        q = trace.question
        tid = str(getattr(trace, "id", ""))
        sources = getattr(trace, "context", None)  # traces.context: the sources the question was asked with
        if fmt == "answer":
            out.append(TextExample(build_messages(q, "answer", sources=sources), build_target("answer", answer=label),
                                   trace_id=tid))
        elif fmt == "step_by_step":
            out.append(TextExample(build_messages(q, fmt, task="label", sources=sources),
                                   build_target(fmt, answer=label, task="label"), alpha, "label", tid))
            out.append(TextExample(build_messages(q, fmt, budget=budget, task="rationale", sources=sources),
                                   rationale_target, 1.0 - alpha, "rationale", tid))
        else:
            out.append(TextExample(build_messages(q, fmt, budget=budget, sources=sources), rationale_target,
                                   trace_id=tid))
            if cfg.budget.compress:
                out.extend(_compressed_rows(cfg, q, rationale_target, label or "", tid, tokenizer, report, sources))
        report.used += 1
    if not out:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.dropped.items())
        if fmt in _NEEDS and report.dropped.get(f"no {_NEEDS[fmt]}", 0):
            style = "pal" if fmt == "pal" else "cot"
            raise TrainError(f"student.format '{fmt}' needs a {_NEEDS[fmt]} in every trace, but none of the "
                             f"{len(traces)} traces has one ({reasons}): set traces.style: {style} and rebuild the "
                             f"trace set, or choose a student.format the traces support (answer)")
        raise TrainError(f"all {len(traces)} traces were filtered out ({reasons}): check the trace set / teacher")
    return out, report


def _compressed_rows(cfg: StageView, question: str, rationale: str, label: str, trace_id: str, tokenizer,
                     report: BuildReport, sources=None) -> list[TextExample]:
    """`budget.compress`: the full rationale with no stated budget, and its compressed form at that form's bucket."""
    from reasonlite.calculator import compress_rationale

    rows = [TextExample(build_messages(question, "cot", sources=sources), rationale, trace_id=trace_id)]
    short = compress_rationale(rationale, label)
    if short is None:  # no equations, or they do not give the label: nothing to compress
        report.drop("not compressible (kept full only)")
        return rows
    if tokenizer is None:
        raise TrainError("budget.compress needs the student tokenizer to bucket compressed rationales")
    bucket = budget_bucket(len(tokenizer(short, add_special_tokens=False)["input_ids"]), cfg.budget.buckets)
    rows.append(TextExample(build_messages(question, "cot", budget=bucket, sources=sources), short, trace_id=trace_id))
    return rows


# ---------------------------------------------------------------------------------------------- tokenisation
def end_of_turn(tokenizer) -> str:
    """The token that closes an assistant turn in the chat template (`<|im_end|>` for SmolLM2)."""
    return tokenizer.eos_token


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def tokenize_example(tokenizer, example: TextExample) -> dict[str, list[int]]:
    p = prompt_ids(tokenizer, example.messages)
    c = tokenizer(example.target + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    return {"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c,
            "prompt_len": len(p)}


MAX_CUT_FRACTION = 0.10


def build_dataset(cfg: StageView, examples: list[TextExample], tokenizer):
    """A `datasets.Dataset` of input_ids / attention_mask / labels (+ loss_weight for step_by_step).

    Refuses max lengths that would cut prompts (then nothing is learnt from the example) or more than 10% of the
    completions, naming `train.max_length` and the length that would fit.
    """
    from datasets import Dataset

    max_len = cfg.train.max_length
    rows = [tokenize_example(tokenizer, ex) for ex in examples]
    lengths = sorted(len(r["input_ids"]) for r in rows)
    longest_prompt = max(r["prompt_len"] for r in rows)
    if longest_prompt >= max_len:
        raise TrainError(f"train.max_length={max_len} is not longer than the longest prompt ({longest_prompt} "
                         f"tokens): raise train.max_length to at least {lengths[-1]}")
    cut = sum(1 for n in lengths if n > max_len)
    if cut > MAX_CUT_FRACTION * len(rows):
        p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
        raise TrainError(f"train.max_length={max_len} would cut {cut}/{len(rows)} examples "
                         f"({cut / len(rows):.0%} > {MAX_CUT_FRACTION:.0%}): raise train.max_length to at least "
                         f"{p90} ({lengths[-1]} fits every example), or cap traces with budget.max_trace_tokens")
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        for key, column in columns.items():
            column.append(r[key][:max_len])
    if cfg.student.format == "step_by_step":
        columns["loss_weight"] = [ex.loss_weight for ex in examples]
    return Dataset.from_dict(columns)
