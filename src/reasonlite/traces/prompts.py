"""Rationale styles: how the teacher is asked for a trace, and how its reply is read back.

Three styles, each a (system instruction, reply format) pair:
  cot           natural-language steps ending "The answer is X."
  pal           a `def solution(): ... return x` program in a ```python block (executed to get the answer)
  step_by_step  distilling step-by-step: the rationale and the label as two outputs, "Rationale: ...\nAnswer: X"
Few-shot exemplars are rendered in the same reply format as prior user/assistant turns, so the teacher copies the
shape. Built-in exemplars are retail-style word problems; `traces.few_shot_path` points at a JSONL of your own
(`question`, `answer`, and `rationale` and/or `program`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reasonlite.answers import extract_answer, normalize_answer
from reasonlite.formats import (
    ANSWER_CUE,
    SourceLike,
    extract_program,
    render_completion,
    sources_message,
    strip_answer_sentence,
)
from reasonlite.jsonl import JsonlError, iter_jsonl

STYLES = ("cot", "pal", "step_by_step")

SYSTEM: dict[str, str] = {
    "cot": ("You are a careful math tutor. Solve the problem step by step, one calculation per line, "
            f"and end with the sentence '{ANSWER_CUE} X.' where X is the final number."),
    "pal": ("You write Python to solve math word problems. Reply with a function `def solution():` that computes the "
            "answer from the quantities in the problem (one step per line, descriptive variable names) and returns "
            "the final number. Reply with the code only, in a ```python block."),
    "step_by_step": ("Explain how to solve the problem in a short rationale, then give the final answer. "
                     "Reply exactly in the form:\nRationale: <the steps>\nAnswer: <the final number>"),
}


@dataclass(frozen=True)
class Exemplar:
    question: str
    answer: str
    rationale: str | None = None
    program: str | None = None


BUILTIN_EXEMPLARS: list[Exemplar] = [
    Exemplar(
        question="A store sells notebooks for $3 each. Maya buys 4 notebooks and pays with a $20 bill. "
                 "How much change does she get?",
        answer="8",
        rationale="4 notebooks cost 4 * 3 = 12 dollars.\nHer change is 20 - 12 = 8 dollars.\nThe answer is 8.",
        program="def solution():\n    notebook_price = 3\n    notebooks = 4\n    paid = 20\n"
                "    cost = notebooks * notebook_price\n    change = paid - cost\n    return change",
    ),
    Exemplar(
        question="A jacket costs $80 and is on sale for 25% off. What is the sale price in dollars?",
        answer="60",
        rationale="The discount is 80 * 25 / 100 = 20 dollars.\nThe sale price is 80 - 20 = 60 dollars.\n"
                  "The answer is 60.",
        program="def solution():\n    price = 80\n    discount_percent = 25\n"
                "    discount = price * discount_percent / 100\n    sale_price = price - discount\n"
                "    return sale_price",
    ),
    Exemplar(
        question="A shop orders 6 boxes with 12 mugs in each box. It sells 50 mugs. How many mugs are left?",
        answer="22",
        rationale="The shop gets 6 * 12 = 72 mugs.\nAfter selling 50, 72 - 50 = 22 mugs are left.\nThe answer is 22.",
        program="def solution():\n    boxes = 6\n    mugs_per_box = 12\n    sold = 50\n"
                "    total_mugs = boxes * mugs_per_box\n    left = total_mugs - sold\n    return left",
    ),
    Exemplar(
        question="Sam earns $15 per hour. He works 6 hours a day for 5 days. How much does he earn in dollars?",
        answer="450",
        rationale="Each day he earns 15 * 6 = 90 dollars.\nIn 5 days he earns 90 * 5 = 450 dollars.\n"
                  "The answer is 450.",
        program="def solution():\n    hourly_wage = 15\n    hours_per_day = 6\n    days = 5\n"
                "    daily_pay = hourly_wage * hours_per_day\n    total_pay = daily_pay * days\n    return total_pay",
    ),
]


def load_exemplars(path: str | Path, style: str) -> list[Exemplar]:
    """Read few-shot exemplars from JSONL; every line needs `question`, `answer` and the field the style shows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"traces.few_shot_path: {path} does not exist; point it at a JSONL of exemplars "
                                "or remove it to use the built-in ones")
    needed = "program" if style == "pal" else "rationale"
    out: list[Exemplar] = []
    for line_no, row in iter_jsonl(path, errors="yield"):
        if isinstance(row, JsonlError):
            raise ValueError(f"traces.few_shot_path {row}; one object per line")  # noqa: TRY004 - bad input file: exit 2
        if not isinstance(row, dict):
            raise ValueError(f"traces.few_shot_path {path}:{line_no}: expected a JSON object per line")  # noqa: TRY004
        missing = [f for f in ("question", "answer", needed) if not str(row.get(f) or "").strip()]
        if missing:
            raise ValueError(f"traces.few_shot_path {path}:{line_no}: missing {missing} (style '{style}' shows the "
                             f"{needed}); add it or remove the line")
        out.append(Exemplar(question=str(row["question"]), answer=str(row["answer"]),
                            rationale=row.get("rationale"), program=row.get("program")))
    return out


def teacher_messages(question: str, style: str, exemplars: list[Exemplar],
                     sources: Sequence[SourceLike] | None = None) -> list[dict]:
    """System instruction, then each exemplar as a user/assistant turn, then the question: after the sources'
    system message (`formats.sources_message`, as the student sees them) when it has sources."""
    if style not in SYSTEM:
        raise ValueError(f"unknown traces.style '{style}': use one of {', '.join(STYLES)}")
    messages = [{"role": "system", "content": SYSTEM[style]}]
    for ex in exemplars:
        reply = render_completion(style, answer=ex.answer, rationale=ex.rationale, program=ex.program)
        if reply is None:
            raise ValueError(f"few-shot exemplar {ex.question[:40]!r} has no {'program' if style == 'pal' else 'rationale'}"
                             f" for style '{style}'")
        messages += [{"role": "user", "content": ex.question.strip()}, {"role": "assistant", "content": reply}]
    if sources:
        messages.append(sources_message(sources))
    messages.append({"role": "user", "content": question.strip()})
    return messages


def pick_exemplars(n: int, style: str, few_shot_path: str | None = None) -> list[Exemplar]:
    pool = load_exemplars(few_shot_path, style) if few_shot_path else BUILTIN_EXEMPLARS
    return pool[:n]


@dataclass(frozen=True)
class ParsedReply:
    rationale: str | None
    program: str | None
    answer: str | None  # for pal this stays None until the program is executed


_STEP_BY_STEP_RE = re.compile(r"Rationale\s*:\s*(.*?)\n\s*(?:Final\s+)?Answer\s*:\s*(.+)", re.DOTALL | re.IGNORECASE)


def parse_reply(style: str, text: str) -> ParsedReply:
    """Read a teacher reply back into (rationale, program, answer). Malformed replies give Nones, never an error."""
    text = (text or "").strip()
    if not text:
        return ParsedReply(None, None, None)
    if style == "pal":
        program = extract_program(text)
        return ParsedReply(None, program if "def solution" in program else None, None)
    if style == "step_by_step":
        m = _STEP_BY_STEP_RE.search(text)
        if m:
            first_line = m.group(2).strip().splitlines()[0] if m.group(2).strip() else ""
            return ParsedReply(m.group(1).strip() or None, None, normalize_answer(first_line))
        # the teacher ignored the two-part format: keep its text as the rationale and look for an answer in it
        return ParsedReply(strip_answer_sentence(text) or None, None, extract_answer(text))
    return ParsedReply(text, None, extract_answer(text))
