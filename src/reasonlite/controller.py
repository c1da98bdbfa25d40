"""The trace-budget controller, written once for every caller: reason under a cap, force an answer where the cap is
hit, execute or read the answers, and sample in rounds that stop once a majority cannot be overturned.

It does no generation itself. `solve(prompts, plan)` is a generator that yields what it needs, and a driver answers:
  `Ask`     generate continuations (prompt + prefix) up to `max_tokens`; answer with one `Generated` per row;
  `Extract` fill the samples' answers (PAL programs run in the sandbox); answer with None.
`run(steps, generate)` drives it with a plain function (`Student`, on a transformers model or scripted completions);
`run_async(steps, generate)` with a coroutine (SLM-Fusion's reasoning layer, on any gateway backend). Both therefore
stop, force, count tokens and vote identically: the gateway serves a student exactly as `reasonlite eval` measures it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reasonlite.formats import Format

if TYPE_CHECKING:
    from reasonlite.infer import Detector, Generated, Sample, Solution


@dataclass
class Plan:
    """What the controller does for one batch of questions (every field is a knob named the same in the config)."""

    fmt: Format
    cap: int  # reasoning tokens per sample (budget, or the generation cap when no budget is set)
    n: int = 1  # samples per question
    temperature: float = 0.0  # 0 = greedy (one sample)
    round_size: int | None = None  # samples per round with early exit; None = all n in one round
    forcing: bool = True  # a capped sample gets its reasoning closed and the answer cue appended
    answer_tokens: int = 16  # generation cap of the forced answer
    early_stop: bool = True  # stop a row once its answer is complete (False: only stop strings / end of turn)
    stop: Sequence[str] = ()


@dataclass
class Ask:
    """Generate one completion per row: the continuation of `prompts[row] + prefix`."""

    rows: list[int]  # index of the prompt each row continues
    prefixes: list[str]  # appended to that prompt ("" in the reasoning pass)
    max_tokens: int
    temperature: float
    detect: Detector  # where a row's completion is finished (cut there), else None
    forced: bool  # the forced-answer pass: one short line or sentence after the cue


@dataclass
class Extract:
    """Fill `answer`, `program`, `status`, `error` of these samples (PAL: run the programs)."""

    samples: list[Sample] = field(default_factory=list)
    fmt: Format = "cot"


Step = Ask | Extract
Steps = Generator[Step, "list[Generated] | None", "list[list[Sample]]"]


def _first_cut(*cuts: int | None) -> int | None:
    found = [c for c in cuts if c is not None]
    return min(found) if found else None


def sample(plan: Plan, rows: list[int], count: Callable[[str], int]) -> Generator[Step, list[Generated] | None,
                                                                                 list[Sample]]:
    """One sample per row (a prompt index): reason up to the cap, then force an answer on the capped rows."""
    from reasonlite.infer import Sample, _line_end, _sentence_end, answer_end, answer_start, force_answer

    fmt = plan.fmt

    def detect(text: str) -> int | None:
        return _first_cut(answer_end(text, fmt) if plan.early_stop else None,
                          *(text.find(s) if s in text else None for s in plan.stop))

    first = yield Ask(rows, [""] * len(rows), plan.cap, plan.temperature, detect, forced=False)
    samples: list[Sample] = []
    to_force: list[int] = []
    for i, gen in enumerate(first):
        cut = detect(gen.text)
        text = gen.text[:cut] if cut is not None else gen.text
        if gen.done or cut is not None:
            start = answer_start(text, fmt)
            answer_tokens = min(count(text[start:]), gen.tokens) if start is not None else 0
            samples.append(Sample(text, gen.tokens - answer_tokens, answer_tokens, forced=False))
        else:
            samples.append(Sample(text, gen.tokens, 0, forced=False))
            if plan.forcing:
                to_force.append(i)
    if to_force:
        # Budget forcing: only the capped rows go again, as prompt + closed reasoning + cue.
        prefixes = [force_answer(samples[i].text, fmt) for i in to_force]
        second = yield Ask([rows[i] for i in to_force], prefixes, plan.answer_tokens, plan.temperature,
                           _line_end if fmt == "pal" else _sentence_end, forced=True)
        for i, prefix, gen in zip(to_force, prefixes, second):
            text = prefix + gen.text
            end = answer_end(text, fmt) if fmt != "pal" else None
            samples[i] = Sample(text[:end] if end is not None else text, samples[i].reasoning_tokens, gen.tokens,
                                forced=True)
    yield Extract(samples, fmt)
    return samples


def solve(n_prompts: int, plan: Plan, count: Callable[[str], int]) -> Steps:
    """`plan.n` samples per prompt, in rounds of `plan.round_size` that stop for a question once its majority cannot
    be overturned (adaptive consistency); one round of n when round_size is None."""
    from reasonlite.vote import majority_is_decided

    drawn: list[list[Sample]] = [[] for _ in range(n_prompts)]
    open_rows = list(range(n_prompts))
    while open_rows:
        # every open question draws the same round of samples, all generated as one batch
        per_round = min(plan.round_size or plan.n, plan.n - len(drawn[open_rows[0]]))
        rows = [q for q in open_rows for _ in range(per_round)]
        samples = yield from sample(plan, rows, count)
        for q, s in zip(rows, samples):
            drawn[q].append(s)
        open_rows = [q for q in open_rows if len(drawn[q]) < plan.n and not (
            plan.round_size is not None and majority_is_decided([s.answer for s in drawn[q]], plan.n))]
    return drawn


def run(steps: Steps, generate: Callable[[Ask], list[Generated]]) -> list[list[Sample]]:
    """Drive the controller with a plain generation function."""
    from reasonlite.infer import extract_answers

    try:
        step = next(steps)
        while True:
            if isinstance(step, Ask):
                step = steps.send(generate(step))
            else:
                extract_answers(step.samples, step.fmt)
                step = steps.send(None)
    except StopIteration as done:
        return done.value


async def run_async(steps: Steps, generate: Callable[[Ask], Awaitable[list[Generated]]]) -> list[list[Sample]]:
    """Drive the controller with a coroutine; the sandbox runs in a thread, off the event loop."""
    from reasonlite.infer import extract_answers

    try:
        step = next(steps)
        while True:
            if isinstance(step, Ask):
                step = steps.send(await generate(step))
            else:
                await asyncio.to_thread(extract_answers, step.samples, step.fmt)
                step = steps.send(None)
    except StopIteration as done:
        return done.value


def vote(samples: list[Sample], latency: float = 0.0, shown_index: int | None = None) -> Solution:
    """The question's answer from its samples: the majority (the sample shown is the first that voted for it), or
    the sample at `shown_index` (a verifier's pick). Tokens are summed over every sample."""
    from reasonlite.answers import normalize_answer
    from reasonlite.infer import Solution
    from reasonlite.vote import majority_vote

    counted = majority_vote([s.answer for s in samples])
    if shown_index is None:
        shown = next((s for s in samples if s.answer is not None and normalize_answer(s.answer) == counted.answer),
                     samples[0])
        answer, agreement = counted.answer, counted.agreement
    else:
        shown = samples[shown_index]
        answer = normalize_answer(shown.answer) if shown.answer is not None else None
        agreement = counted.counts.get(answer, 0) / len(samples)
    return Solution(answer=answer, status=shown.status, text=shown.text, program=shown.program, agreement=agreement,
                    samples=len(samples), reasoning_tokens=sum(s.reasoning_tokens for s in samples),
                    answer_tokens=sum(s.answer_tokens for s in samples), forced=shown.forced, latency_s=latency,
                    error=shown.error, votes=counted.counts)
