"""Verification: turn each teacher reply into a `Trace` with an answer and a status.

PAL programs are extracted (`formats.extract_program`) and executed in the sandbox, all at once (`execute_many`); a
CoT / step-by-step answer is read with `answers.extract_answer`. Status against the label (gold, or the majority
vote when there is no gold - see self_consistency):
  correct     the answer matches the label (`answers.answers_match`)
  wrong       an answer that does not match
  exec_error  a program that failed in the sandbox (syntax, forbidden, timeout, memory, runtime, no_solution)
  no_answer   nothing usable: empty/malformed reply, no `def solution`, no answer in the text
  unverified  an answer with no label to check it against (no gold and pseudo-labels off)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field

from reasonlite.answers import answers_match, normalize_answer
from reasonlite.data.example import Source
from reasonlite.traces.prompts import parse_reply

# k samples of a question repeat answers (and often whole texts): memoise the pure, string-keyed checks
_match = lru_cache(maxsize=65536)(answers_match)
_parse = lru_cache(maxsize=16384)(parse_reply)

Status = Literal["correct", "wrong", "exec_error", "no_answer", "unverified"]


class Trace(BaseModel):
    """One teacher sample for one question, verified."""

    id: str = Field(description="'<example_id>#<sample_index>'")
    example_id: str
    question: str
    gold: str | None = Field(None, description="the dataset's answer, when it has one")
    label: str | None = Field(None, description="what the trace is checked against: gold, else the pseudo-label")
    pseudo_label: bool = Field(False, description="label is the self-consistency majority, not gold")
    domain: str = "general"
    style: Literal["cot", "pal", "step_by_step"]
    text: str = Field(description="raw teacher completion")
    rationale: str | None = None
    program: str | None = None
    answer: str | None = Field(None, description="extracted (cot) or executed (pal) answer, normalised")
    status: Status = "no_answer"
    error: str | None = Field(None, description="why exec_error / no_answer (sandbox error kind and message)")
    sample_index: int = 0
    tokens: int | None = Field(None, description="student-tokenizer length of the rationale (or program for pal)")
    agreement: float | None = Field(None, description="share of the question's k samples that gave the majority answer")
    truncated: bool = False
    context: list[Source] | None = Field(None, description="the sources the teacher and the student are shown with the "
                                                           "question (traces.context)")

    @property
    def reasoning(self) -> str | None:
        """What the student learns to write: the program for pal, the rationale otherwise."""
        return self.program if self.style == "pal" else self.rationale


def parse_trace(example, style: str, text: str, sample_index: int, error: str | None = None,
                context: list[Source] | None = None) -> Trace:
    """A Trace from a raw reply (answer still unknown for pal until `execute_programs`); `context`: the sources the
    question was asked with."""
    parsed = _parse(style, text or "")
    trace = Trace(id=f"{example.id}#{sample_index}", example_id=example.id, question=example.question,
                  gold=normalize_answer(example.answer) if example.answer is not None else None,
                  domain=example.domain, style=style, text=text or "", rationale=parsed.rationale,
                  program=parsed.program, answer=parsed.answer, sample_index=sample_index, context=context)
    if error is not None:
        trace.error = error
    elif style == "pal" and trace.program is None:
        trace.error = "no `def solution()` in the reply"
    elif style != "pal" and trace.answer is None:
        trace.error = "no answer found in the reply"
    return trace


def execute_programs(traces: list[Trace], sandbox=None) -> None:
    """Run every PAL program (in one `execute_many` batch) and store its answer, or the sandbox error."""
    todo = [t for t in traces if t.style == "pal" and t.program]
    if not todo:
        return
    if sandbox is None:
        from reasonlite.sandbox import execute_many

        results = execute_many([t.program for t in todo])
    else:
        results = sandbox.run_many([t.program for t in todo])
    for trace, result in zip(todo, results):
        if result.ok:
            trace.answer = normalize_answer(result.value) if not isinstance(result.value, bool) else None
            if trace.answer is None:
                trace.error = f"solution() returned {result.value!r}, not an answer"
        else:
            trace.error = f"{result.error}: {result.message}"[:300]


def grade(trace: Trace, label: str | None, pseudo: bool = False) -> Trace:
    """Set the trace's label and status."""
    trace.label, trace.pseudo_label = label, pseudo and label is not None
    if trace.answer is None:
        ran_and_failed = trace.style == "pal" and trace.program is not None
        trace.status = "exec_error" if ran_and_failed else "no_answer"
    elif label is None:
        trace.status = "unverified"
    else:
        trace.status = "correct" if _match(trace.answer, label) else "wrong"
    return trace
