"""The trace-budget controller.

Data side (this module's first half): how long a trace is, counted with the *student's* tokenizer (the student is
the one that has to produce it), what to do with traces over `budget.max_trace_tokens`, and the length buckets that
budget-conditioned training states in the prompt.

Policies for over-budget traces:
  drop             remove them
  prefer_shortest  per question keep ONE trace: the shortest correct trace that fits, else the shortest correct one
  truncate         cut the reasoning to the budget and append TRUNCATION_MARKER (`truncated=True`). A truncated PAL
                   program no longer runs; prefer `drop` for PAL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

DataPolicy = Literal["drop", "prefer_shortest", "truncate"]
TRUNCATION_MARKER = " [truncated]"
CHARS_PER_TOKEN = 4  # the estimate used when no tokenizer is given


def count_tokens(text: str | None, tokenizer: Any = None) -> int:
    """Tokens of `text` with the student's tokenizer (no special tokens); len/4 when `tokenizer` is None."""
    if not text:
        return 0
    if tokenizer is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens_many(texts: Sequence[str | None], tokenizer: Any = None) -> list[int]:
    """`count_tokens` for many texts in one (fast, batched) tokenizer call."""
    if tokenizer is None:
        return [count_tokens(t) for t in texts]
    present = [t or "" for t in texts]
    if not present:
        return []
    ids = tokenizer(present, add_special_tokens=False)["input_ids"]
    return [len(x) if t else 0 for x, t in zip(ids, texts)]


def token_stats(lengths: Sequence[int]) -> dict:
    """n, mean, p50, p95, max of token lengths (zeros when empty)."""
    if not lengths:
        return {"n": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    a = np.asarray(lengths, dtype=float)
    return {"n": int(a.size), "mean": round(float(a.mean()), 2), "p50": round(float(np.percentile(a, 50)), 2),
            "p95": round(float(np.percentile(a, 95)), 2), "max": int(a.max())}


def stated_budget(budget: int | None, conditioned: bool, buckets: Sequence[int] | None) -> int | None:
    """The budget a student is told in its prompt (the one rule for `reasonlite eval` and the gateway): none unless it
    was trained budget-conditioned; then the largest training bucket that fits the budget (the smallest when none
    fits), since it never saw any other number."""
    if budget is None or not conditioned:
        return None
    if not buckets:
        return budget
    fitting = [b for b in buckets if b <= budget]
    return max(fitting) if fitting else min(buckets)


def budget_bucket(n_tokens: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n_tokens; the largest bucket when n_tokens exceeds them all."""
    for b in buckets:
        if n_tokens <= b:
            return b
    return buckets[-1]


def _reasoning_field(trace: Any) -> str:
    return "program" if trace.style == "pal" else "rationale"


def truncate_text(text: str, max_tokens: int, tokenizer: Any = None) -> str:
    """`text` cut so that it plus TRUNCATION_MARKER fits in max_tokens (student tokens, or len/4 estimate)."""
    room = max(max_tokens - count_tokens(TRUNCATION_MARKER, tokenizer), 1)
    if tokenizer is None:
        return text[: room * CHARS_PER_TOKEN].rstrip() + TRUNCATION_MARKER
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:room]
    cut = tokenizer.decode(ids)
    # decoding a prefix can re-tokenise longer at the seam: shave tokens until the result fits
    while room > 1 and count_tokens(cut.rstrip() + TRUNCATION_MARKER, tokenizer) > max_tokens:
        room -= 1
        cut = tokenizer.decode(ids[:room])
    return cut.rstrip() + TRUNCATION_MARKER


def apply_budget(traces: list, max_tokens: int | None, policy: DataPolicy, tokenizer: Any = None) -> list:
    """Apply a data-side policy to traces (objects with example_id, style, tokens, rationale/program, sample_index).

    Traces without `tokens` are counted first. Returns new objects; the input list is not modified.
    """
    if policy not in ("drop", "prefer_shortest", "truncate"):
        raise ValueError(f"budget.data_policy '{policy}' is unknown: use drop, prefer_shortest or truncate")
    traces = [t if t.tokens is not None else t.model_copy(
        update={"tokens": count_tokens(getattr(t, _reasoning_field(t)), tokenizer)}) for t in traces]
    if max_tokens is None:
        return traces
    if policy == "drop":
        return [t for t in traces if t.tokens <= max_tokens]
    if policy == "truncate":
        out = []
        for t in traces:
            if t.tokens <= max_tokens:
                out.append(t)
                continue
            field = _reasoning_field(t)
            cut = truncate_text(getattr(t, field) or "", max_tokens, tokenizer)
            out.append(t.model_copy(update={field: cut, "truncated": True, "tokens": count_tokens(cut, tokenizer)}))
        return out
    # prefer_shortest: one trace per question
    by_question: dict[str, list] = {}
    for t in traces:
        by_question.setdefault(t.example_id, []).append(t)
    out = []
    for group in by_question.values():
        correct = [t for t in group if getattr(t, "status", "correct") == "correct"] or group
        shortest = min(correct, key=lambda t: (t.tokens, t.sample_index))
        fitting = [t for t in correct if t.tokens <= max_tokens]
        out.append(min(fitting, key=lambda t: (t.tokens, t.sample_index)) if fitting else shortest)
    return out
