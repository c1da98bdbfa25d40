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
import re
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from reasonlite.formats import ANSWER_CUE, Format

Status = Literal["ok", "budget_forced", "exec_error", "no_answer"]

# --------------------------------------------------------------------------------------------------------------------
# Where an answer ends (early stop) and how to force one (budget forcing)
# --------------------------------------------------------------------------------------------------------------------

_CUE_RE = re.compile(re.escape(ANSWER_CUE), re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s)|\n")  # "2.5" is not a sentence end: the period must precede whitespace
_DEF_RE = re.compile(r"^([ \t]*)def solution\s*\([^)\n]*\)\s*(?:->[^:\n]*)?:[ \t]*([^\n]*)$", re.MULTILINE)


def _sentence_end(text: str, start: int = 0) -> int | None:
    """End (exclusive) of the first sentence or line with content at or after `start`; None while it is unfinished."""
    content = re.compile(r"\S").search(text, start)
    if content is None:
        return None
    end = _SENTENCE_END_RE.search(text, content.start())
    if end is None:
        return None
    return end.end() if end.group() == "." else end.start()


def _line_end(text: str) -> int | None:
    """End of the first line with content (the forced `return ...` expression); None while it is unfinished."""
    content = re.compile(r"\S").search(text)
    if content is None:
        return None
    newline = text.find("\n", content.start())
    return newline if newline >= 0 else None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _program_end(text: str) -> int | None:
    """End of a PAL program: its top-level `return` line is finished, a closing fence, or a dedent out of the body."""
    match = _DEF_RE.search(text)
    if match is None:
        return None
    if match.group(2).strip() and not match.group(2).strip().startswith("#"):  # `def solution(): return 3`
        return match.end() if text.startswith("\n", match.end()) else None
    def_indent, body_indent = len(match.group(1)), None
    pos = match.end() + 1
    while pos <= len(text):
        newline = text.find("\n", pos)
        complete = newline >= 0
        line = text[pos: newline if complete else len(text)]
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            if stripped.startswith("```"):
                return pos  # the fence closes the program
            indent = _indent(line)
            if body_indent is None:
                if indent <= def_indent:
                    return pos  # a top-level line right after the def: nothing more belongs to the program
                body_indent = indent
            elif indent < body_indent:
                return pos  # dedent out of solution(), e.g. `print(solution())`
            if indent == body_indent and re.match(r"return\b", stripped) and complete:
                return newline
        if not complete:
            return None
        pos = newline + 1
    return None


def answer_end(text: str, fmt: Format) -> int | None:
    """Where the completion's answer is complete (cut the text there), or None if it is not complete yet."""
    if fmt == "pal":
        return _program_end(text)
    cues = list(_CUE_RE.finditer(text))
    if cues:
        end = _sentence_end(text, cues[-1].end())
        if end is not None:
            return end
    if fmt in ("answer", "step_by_step"):  # the label task answers in one line/sentence
        return _sentence_end(text)
    return None


def answer_start(text: str, fmt: Format) -> int | None:
    """Where the answer part of a finished completion starts: the last cue, or the final `return` line."""
    if fmt == "pal":
        returns = list(re.finditer(r"^[ \t]*return\b", text, re.MULTILINE))
        return returns[-1].start() if returns else None
    cues = list(_CUE_RE.finditer(text))
    return cues[-1].start() if cues else None


def force_answer(partial: str, fmt: Format) -> str:
    """The text generation continues from when the cap is hit first: the reasoning closed, then the answer cue."""
    if fmt == "pal":
        return _force_return(partial)
    if _CUE_RE.search(partial.rsplit("\n", 1)[-1]):
        return partial  # the answer sentence has begun: let it finish
    head = partial.rstrip()
    return f"{head}\n{ANSWER_CUE}" if head else ANSWER_CUE


def _force_return(partial: str) -> str:
    lines = partial.split("\n")[:-1]  # complete lines only: the unfinished last line is dropped
    def_index = next((i for i, line in enumerate(lines) if _DEF_RE.match(line)), None)
    if def_index is None:
        lines.append("def solution():")
        return "\n".join(lines) + "\n    return "
    # a block opener without its body (`for x in y:`) would make the appended return an IndentationError
    while len(lines) > def_index + 1 and (not lines[-1].strip() or lines[-1].rstrip().endswith(":")):
        lines.pop()
    body = [line for line in lines[def_index + 1:] if line.strip()]
    indent = body[0][: _indent(body[0])] if body else lines[def_index][: _indent(lines[def_index])] + "    "
    return "\n".join(lines) + f"\n{indent}return "



@dataclass
class Generated:
    """One raw completion: `done` means it stopped on its own (answer complete, stop string, end of turn)."""

    text: str
    tokens: int
    done: bool


Detector = Callable[[str], "int | None"]  # completion text -> cut position once it is finished, else None


# --------------------------------------------------------------------------------------------------------------------
# Solutions
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sampled completion after budget forcing and answer extraction/execution."""

    text: str
    reasoning_tokens: int
    answer_tokens: int
    forced: bool
    program: str | None = None
    answer: str | None = None
    status: Status = "ok"
    error: str | None = None


@dataclass
class Solution:
    """The student's answer to one question (after voting when n > 1)."""

    answer: str | None  # normalised final answer; None when no sample produced one
    status: Status  # ok | budget_forced | exec_error | no_answer (of the sample shown in `text`)
    text: str  # the completion (a sample that voted for the answer)
    program: str | None = None  # pal: the executed program
    agreement: float = 0.0  # share of samples that voted for `answer`: a confidence in [0, 1]
    samples: int = 1  # samples actually drawn (< n when adaptive consistency stopped early)
    reasoning_tokens: int = 0  # generated reasoning tokens, summed over samples
    answer_tokens: int = 0  # generated answer tokens (incl. the forced answer), summed over samples
    forced: bool = False  # the shown sample's answer came from budget forcing
    latency_s: float = 0.0  # wall time of the batch this question was solved in
    error: str | None = None  # exec error message (pal)
    votes: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.reasoning_tokens + self.answer_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def extract_answers(samples: Sequence[Any], fmt: Format) -> None:
    """Fill each sample's answer/status (objects with text, forced, program, answer, status, error fields): pal
    programs run in the sandbox in parallel, an exec error is a status; other formats are read from the text.
    Shared with SLM-Fusion's reasoning layer."""
    from reasonlite.answers import extract_answer, normalize_answer

    if fmt == "pal":
        from reasonlite.formats import extract_program
        from reasonlite.sandbox import execute_many

        for s in samples:
            s.program = extract_program(s.text)
        for s, result in zip(samples, execute_many([s.program for s in samples])):
            if result.ok:
                s.answer = normalize_answer(str(result.value)) if result.value is not None else None
            else:
                s.status, s.error = "exec_error", f"{result.error}: {result.message}"
    else:
        for s in samples:
            s.answer = extract_answer(s.text)
    for s in samples:
        if s.status == "ok":
            s.status = "no_answer" if s.answer is None else "budget_forced" if s.forced else "ok"


# --------------------------------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------------------------------


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


SELECT_MODES: tuple[str, ...] = ("greedy", "vote", "verifier")


def select_index(samples: Sequence[Any], mode: str, scores: Sequence[float] | None = None) -> int:
    """Which sample answers: greedy = the first; vote = the first that voted for the majority; verifier = the
    highest score among samples with an answer (an exec error never wins), ties to the earlier sample."""
    from reasonlite.answers import normalize_answer
    from reasonlite.vote import majority_vote

    if mode == "greedy" or not samples:
        return 0
    if mode == "vote":
        winner = majority_vote([s.answer for s in samples]).answer
        return next((i for i, s in enumerate(samples) if s.answer is not None and normalize_answer(s.answer) == winner),
                    0)
    if mode == "verifier":
        if scores is None or len(scores) != len(samples):
            raise ValueError("select 'verifier' needs one score per sample")
        answered = [i for i, s in enumerate(samples) if s.answer is not None] or list(range(len(samples)))
        return max(answered, key=lambda i: (scores[i], -i))
    raise ValueError(f"select '{mode}' is not one of {', '.join(SELECT_MODES)}")


def vote(samples: list[Sample], latency: float = 0.0, shown_index: int | None = None) -> Solution:
    """The question's answer from its samples: the majority (the sample shown is the first that voted for it), or
    the sample at `shown_index` (a verifier's pick). Tokens are summed over every sample."""
    from reasonlite.answers import normalize_answer
    from reasonlite.vote import majority_vote

    counted = majority_vote([s.answer for s in samples])
    if shown_index is None:
        shown = samples[select_index(samples, "vote")]
        answer, agreement = counted.answer, counted.agreement
    else:
        shown = samples[shown_index]
        answer = normalize_answer(shown.answer) if shown.answer is not None else None
        agreement = counted.counts.get(answer, 0) / len(samples)
    return Solution(answer=answer, status=shown.status, text=shown.text, program=shown.program, agreement=agreement,
                    samples=len(samples), reasoning_tokens=sum(s.reasoning_tokens for s in samples),
                    answer_tokens=sum(s.answer_tokens for s in samples), forced=shown.forced, latency_s=latency,
                    error=shown.error, votes=counted.counts)
