"""How a student sees a question and what it must answer, shared by training and inference.

Training and inference must build byte-identical prompts, so both call `build_messages`; the chat template of the
student turns the messages into text. Formats:
  answer        question -> "The answer is X."            (no-rationale baseline)
  cot           question -> steps ... "The answer is X."
  pal           question -> a `def solution(): ... return x` program, executed in the sandbox at inference
  step_by_step  distilling step-by-step: the same question under two task prefixes, [label] -> answer and
                [rationale] -> rationale; at inference the cheap [label] task answers.
A budget (budget-conditioned training / inference) adds "Use at most N tokens." to the prompt.
Sources (a question answered from documents) come first, as ONE system message: `SOURCES_PREAMBLE` and the numbered
`[n] filename` blocks (`sources_message`). SLM-Fusion's retrieval (`slm_fusion.context.retrieve.augment`) renders the
sources it packs with the same function, so a student served behind the gateway's vector-store retrieval reads the
prompt it was trained and evaluated on, byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, Protocol

Format = Literal["answer", "cot", "pal", "step_by_step"]
Task = Literal["label", "rationale"]

ANSWER_CUE = "The answer is"
INSTRUCTIONS: dict[str, str] = {
    "answer": "Reply with the final answer only.",
    "cot": f"Solve it step by step and end with '{ANSWER_CUE} X.'",
    "pal": "Write a Python function solution() that computes and returns the answer.",
}
TASK_PREFIX: dict[str, str] = {"label": "[label]", "rationale": "[rationale]"}


SOURCES_PREAMBLE = "Answer from these sources; say so when they do not hold the answer."


class SourceLike(Protocol):
    """Anything with a filename and a text: `reasonlite.data.Source`, a gateway search `Hit`."""

    filename: str
    text: str


def budget_line(budget: int) -> str:
    return f"Use at most {budget} tokens."


def source_block(index: int, source: SourceLike) -> str:
    """One source as the model sees it: `[index] filename`, then its text."""
    return f"[{index}] {source.filename}\n{source.text}"


def sources_message(sources: Sequence[SourceLike]) -> dict:
    """The system message that puts sources before a question (numbered from 1, in the order given)."""
    blocks = [source_block(i, s) for i, s in enumerate(sources, 1)]
    return {"role": "system", "content": SOURCES_PREAMBLE + "\n\n" + "\n\n".join(blocks)}


def build_messages(question: str, fmt: Format, budget: int | None = None, task: Task | None = None,
                   sources: Sequence[SourceLike] | None = None) -> list[dict]:
    """Chat messages for the student: the sources' system message when there are any, then the user turn (the
    tokenizer's chat template adds the rest)."""
    if fmt == "step_by_step":
        task = task or "label"
        text = f"{TASK_PREFIX[task]} {question.strip()}"
    elif fmt in INSTRUCTIONS:
        text = f"{question.strip()}\n{INSTRUCTIONS[fmt]}"
    else:
        raise ValueError(f"unknown student format '{fmt}': use one of answer, cot, pal, step_by_step")
    if budget is not None:
        text += f"\n{budget_line(budget)}"
    context = [sources_message(sources)] if sources else []
    return [*context, {"role": "user", "content": text}]


def answer_sentence(answer: str) -> str:
    return f"{ANSWER_CUE} {answer}."


def ensure_answer_sentence(rationale: str, answer: str) -> str:
    """A CoT target always ends with the marked answer, even when the teacher's text did not."""
    text = rationale.strip()
    if re.search(re.escape(ANSWER_CUE), text.splitlines()[-1] if text else ""):
        return text
    return f"{text}\n{answer_sentence(answer)}".strip()


def build_target(fmt: Format, *, answer: str, rationale: str | None = None, program: str | None = None,
                 task: Task | None = None) -> str:
    """The completion the student is trained to produce for one example."""
    if fmt == "answer" or (fmt == "step_by_step" and (task or "label") == "label"):
        return answer_sentence(answer)
    if fmt == "pal":
        if not program:
            raise ValueError("format 'pal' needs a program for every trace: use traces.style: pal")
        return program.strip()
    if not rationale:
        raise ValueError(f"format '{fmt}' needs a rationale for every trace: use traces.style: cot")
    return ensure_answer_sentence(rationale, answer)


def extract_program(text: str) -> str:
    """The program part of a PAL completion (fenced or bare), from `def solution` on."""
    fenced = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", text, re.DOTALL)
    code = fenced.group(1) if fenced else text
    start = code.find("def solution")
    return (code[start:] if start >= 0 else code).strip()


def strip_answer_sentence(rationale: str) -> str:
    """The steps of a CoT rationale without its closing "The answer is X." line (step_by_step shows them apart)."""
    text = rationale.strip()
    # the cue may close the last line ("... = 382. The answer is 382.") or stand on its own line
    return re.sub(rf"(?:^|(?<=[.!?\s])){re.escape(ANSWER_CUE)}\b[^\n]*$", "", text, flags=re.IGNORECASE).strip()


def render_completion(style: str, *, answer: str | None, rationale: str | None = None,
                      program: str | None = None) -> str | None:
    """An ideal teacher reply in a style (used for exemplars and by the dataset teacher); None if a field is missing."""
    if style == "pal":
        return f"```python\n{program.strip()}\n```" if program else None
    if not rationale or answer is None:
        return None
    if style == "cot":
        return ensure_answer_sentence(rationale, answer)
    if style == "step_by_step":
        return f"Rationale: {strip_answer_sentence(rationale)}\nAnswer: {answer}"
    raise ValueError(f"unknown traces.style '{style}': use one of cot, pal, step_by_step")
