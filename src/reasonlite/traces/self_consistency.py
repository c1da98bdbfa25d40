"""Self-consistency over the k teacher samples of a question: vote, label, filter, select.

The vote (`reasonlite.vote.majority_vote`) counts the answers of all k samples (failed samples count in the
denominator, so agreement is the majority's share of ALL samples). The label is the gold answer when the example
has one; otherwise, with `pseudo_label` on, the majority answer becomes the label and traces agreeing with it are
"correct" relative to it (`pseudo_label=True`). A question whose agreement is below `min_agreement` keeps its traces
in all_traces.jsonl but none is selected (the teacher was unsure). Selection policies:
  all_correct       every correct trace (identical texts kept once: they add nothing but weight)
  one_per_question  the first correct trace (lowest sample index)
  shortest_correct  the correct trace with the fewest student tokens
"""

from __future__ import annotations

from dataclasses import dataclass

from reasonlite.traces.verify import Trace, grade
from reasonlite.vote import majority_vote

SELECTIONS = ("all_correct", "one_per_question", "shortest_correct")


@dataclass(frozen=True)
class QuestionVote:
    example_id: str
    label: str | None
    pseudo_label: bool
    agreement: float
    counts: dict
    passed: bool  # agreement >= min_agreement (and some label exists when verifying)


def vote_and_grade(traces: list[Trace], gold: str | None, min_agreement: float = 0.0,
                   pseudo_label: bool = True) -> QuestionVote:
    """Vote over one question's traces, then grade each against gold (or the pseudo-label). Mutates the traces."""
    vote = majority_vote([t.answer for t in traces])
    use_pseudo = gold is None and pseudo_label and vote.answer is not None
    label = gold if gold is not None else (vote.answer if use_pseudo else None)
    for t in traces:
        grade(t, label, pseudo=use_pseudo)
        t.agreement = vote.agreement
    example_id = traces[0].example_id if traces else ""
    return QuestionVote(example_id, label, use_pseudo, vote.agreement, vote.counts,
                        passed=vote.agreement >= min_agreement)


def select(traces: list[Trace], policy: str, verify: bool = True) -> list[Trace]:
    """The traces of ONE question to train on. verify=False keeps answered traces whatever their status."""
    if policy not in SELECTIONS:
        raise ValueError(f"traces.self_consistency.selection '{policy}' is unknown: use one of {', '.join(SELECTIONS)}")
    if verify:
        pool = [t for t in traces if t.status == "correct"]
    else:
        pool = [t for t in traces if t.status in ("correct", "wrong", "unverified")]
    pool.sort(key=lambda t: t.sample_index)
    if not pool:
        return []
    if policy == "one_per_question":
        return [pool[0]]
    if policy == "shortest_correct":
        return [min(pool, key=lambda t: (t.tokens if t.tokens is not None else len(t.reasoning or ""),
                                         t.sample_index))]
    seen: set[str] = set()
    unique = []
    for t in pool:
        key = (t.reasoning or t.text).strip()
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique
