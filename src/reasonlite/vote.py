"""Majority voting over sampled answers (self-consistency), shared by traces, inference and the gateway."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class VoteResult:
    answer: str | None  # the majority answer (normalised); None when no sample produced an answer
    agreement: float  # share of ALL samples that voted for it: a confidence in [0, 1]
    counts: dict[str, int] = field(default_factory=dict)
    n: int = 0


def _key(answer: str | None) -> str | None:
    from reasonlite.answers import normalize_answer

    return normalize_answer(answer) if answer is not None else None


def majority_vote(answers: list[str | None]) -> VoteResult:
    """Most common normalised answer; ties go to the answer seen first (stable across runs)."""
    keys = [_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return VoteResult(None, 0.0, {}, len(answers))
    best = max(counts, key=lambda k: (counts[k], -keys.index(k)))
    return VoteResult(best, counts[best] / len(answers), dict(counts), len(answers))


def majority_is_decided(answers: list[str | None], total: int) -> bool:
    """Adaptive consistency: True once the leader cannot be overturned by the samples still to come."""
    counts = Counter(k for k in (_key(a) for a in answers) if k is not None)
    if not counts:
        return False
    ranked = counts.most_common(2)
    lead = ranked[0][1]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    remaining = total - len(answers)
    return lead > runner_up + remaining
