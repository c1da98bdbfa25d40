"""Contrastive pairs: (question, chosen = a correct trace, rejected = an incorrect trace of the same question).

Real negatives come first: the teacher's own wrong traces (then PAL programs that crashed), at most
MAX_PAIRS_PER_QUESTION per question, each paired with one of the question's selected traces. When the teacher made
no mistake and `traces.counterfactual_negatives` is on, a counterfactual negative is made from the chosen trace:

  pal  `ast` locates one numeric literal or one + - * / operator in the program; that token alone is replaced
       (3 -> 4, + -> -) so the rest of the program is byte-identical to the chosen one and the only signal is the
       mistake. Candidates run in the sandbox; the first that executes to an answer different from the label wins.
  cot / step_by_step  the final answer X becomes X' (X + a small offset) consistently in the answer line and in the
       intermediate step that computed it ("... = X"), so the rejected rationale reads fluently but its last
       arithmetic step is wrong. Accepted only when `extract_answer` reads X' back from it.
"""

from __future__ import annotations

import ast
import random
import re
from functools import lru_cache

from pydantic import BaseModel

from reasonlite.answers import answers_match, extract_answer, format_number, normalize_answer, to_number
from reasonlite.traces.verify import Trace

MAX_PAIRS_PER_QUESTION = 2
MAX_PROGRAM_CANDIDATES = 6
_SWAP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*")}


class Pair(BaseModel):
    example_id: str
    question: str
    style: str
    chosen: str
    rejected: str
    chosen_answer: str | None
    rejected_answer: str | None
    counterfactual: bool = False
    chosen_id: str | None = None
    rejected_id: str | None = None  # None for counterfactual negatives
    edit: str | None = None  # what the counterfactual changed, e.g. "number 3 -> 4 at line 2"


# ---------------------------------------------------------------------------------------------------------------
# PAL: one-token edits located with ast
# ---------------------------------------------------------------------------------------------------------------

def _byte_offsets(source: bytes) -> list[int]:
    starts, pos = [0], 0
    for line in source.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def _bumped(value: float, rng: random.Random) -> int | float:
    if isinstance(value, int):
        return value + rng.choice([1, 2, 3]) if value >= 0 else value - 1
    return round(value * rng.choice([1.5, 2.0]) + 0.5, 6)


def program_edits(program: str, rng: random.Random, limit: int = MAX_PROGRAM_CANDIDATES) -> list[tuple[str, str]]:
    """Up to `limit` (edited program, description) candidates, each changing exactly one number or operator."""
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return []
    src = program.encode()
    starts = _byte_offsets(src)  # ast columns are UTF-8 byte offsets

    def at(line: int, col: int) -> int:
        return starts[line - 1] + col

    edits: list[tuple[int, int, bytes, str]] = []  # (start, end, replacement, description)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            start, end = at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)
            if src[start:end].strip(b"0123456789._eE+-") != b"":  # not a plain literal in the text (folded?)
                continue
            new = _bumped(node.value, rng)
            edits.append((start, end, repr(new).encode(), f"number {node.value!r} -> {new!r} at line {node.lineno}"))
        elif isinstance(node, ast.BinOp) and type(node.op) in _SWAP:
            old, new = _SWAP[type(node.op)]
            gap_start = at(node.left.end_lineno, node.left.end_col_offset)
            gap_end = at(node.right.lineno, node.right.col_offset)
            gap = src[gap_start:gap_end]
            # the gap holds the operator plus spaces / closing parens; a double symbol (**, //) is another op
            hits = [m.start() for m in re.finditer(re.escape(old.encode()), gap)]
            if len(hits) == 1 and old.encode() * 2 not in gap:
                pos = gap_start + hits[0]
                edits.append((pos, pos + 1, new.encode(), f"operator {old} -> {new} at line {node.lineno}"))
    rng.shuffle(edits)
    out = []
    for start, end, repl, desc in edits[:limit]:
        edited = (src[:start] + repl + src[end:]).decode()
        try:
            ast.parse(edited)
        except SyntaxError:
            continue
        out.append((edited, desc))
    return out


# ---------------------------------------------------------------------------------------------------------------
# CoT: the answer changed consistently in the final step and the answer line
# ---------------------------------------------------------------------------------------------------------------

_normalized = lru_cache(maxsize=65536)(normalize_answer)
_NUM_RE = re.compile(r"(?<![\w.])\$?(-?\d[\d,]*(?:\.\d+)?)(?![\w])")


def perturb_rationale(rationale: str, answer: str, rng: random.Random) -> tuple[str, str, str] | None:
    """(rejected rationale, its answer, description) or None when the answer cannot be found in the text."""
    value = to_number(answer)
    if value is None:
        return None
    offset = rng.choice([1, 2, 3, 5, 10])
    new_value = normalize_answer(format_number(value + offset if value == int(value) else value + offset / 2))
    lines = rationale.splitlines()

    target = normalize_answer(answer)

    def occurrences(line: str) -> list[re.Match]:
        return [m for m in _NUM_RE.finditer(line) if _normalized(m.group(1).replace(",", "")) == target]

    answer_line = max((i for i, line in enumerate(lines) if occurrences(line)), default=None)
    if answer_line is None:
        return None
    changed = [answer_line]
    # the intermediate step that computed it: the latest earlier line where it appears as a result ("= X")
    for i in range(answer_line - 1, -1, -1):
        if any(re.search(r"=\s*\$?\s*$", lines[i][: m.start(1)]) for m in occurrences(lines[i])):
            changed.append(i)
            break
    for i in changed:
        line = lines[i]
        for m in reversed(occurrences(line)):
            if i != answer_line and not re.search(r"=\s*\$?\s*$", line[: m.start(1)]):
                continue
            line = line[: m.start(1)] + new_value + line[m.end(1):]
        lines[i] = line
    rejected = "\n".join(lines)
    got = extract_answer(rejected)
    if got is None or not answers_match(got, new_value) or answers_match(got, answer):
        return None
    return rejected, new_value, f"answer {answer} -> {new_value} in lines {sorted(i + 1 for i in changed)}"


# ---------------------------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------------------------

def _pair(chosen: Trace, rejected_text: str, rejected_answer: str | None, *, counterfactual: bool,
          rejected_id: str | None = None, edit: str | None = None) -> Pair:
    return Pair(example_id=chosen.example_id, question=chosen.question, style=chosen.style,
                chosen=chosen.reasoning or "", rejected=rejected_text, chosen_answer=chosen.answer,
                rejected_answer=rejected_answer, counterfactual=counterfactual, chosen_id=chosen.id,
                rejected_id=rejected_id, edit=edit)


def make_pairs(all_traces: list[Trace], selected: list[Trace], counterfactual: bool = True, seed: int = 0,
               sandbox=None) -> list[Pair]:
    """Pairs for every question with a selected trace: real negatives first, else (optionally) counterfactuals."""
    by_question: dict[str, list[Trace]] = {}
    for t in all_traces:
        by_question.setdefault(t.example_id, []).append(t)
    chosen_by_question: dict[str, list[Trace]] = {}
    for t in selected:
        chosen_by_question.setdefault(t.example_id, []).append(t)

    pairs: list[Pair] = []
    need_counterfactual: list[Trace] = []
    for qid, chosen in chosen_by_question.items():
        group = sorted(by_question.get(qid, []), key=lambda t: t.sample_index)
        negatives, seen = [], set()
        for status in ("wrong", "exec_error"):
            for t in group:
                if t.status == status and t.reasoning and t.reasoning.strip() not in seen:
                    seen.add(t.reasoning.strip())
                    negatives.append(t)
        for j, neg in enumerate(negatives[:MAX_PAIRS_PER_QUESTION]):
            pairs.append(_pair(chosen[j % len(chosen)], neg.reasoning, neg.answer, counterfactual=False,
                               rejected_id=neg.id))
        if not negatives and counterfactual:
            need_counterfactual.append(chosen[0])

    # counterfactuals: PAL candidates of every question are executed in one sandbox batch
    pal_candidates: list[tuple[Trace, str, str]] = []
    for chosen in need_counterfactual:
        rng = random.Random(f"{seed}:{chosen.example_id}")
        if chosen.style == "pal":
            pal_candidates += [(chosen, prog, desc) for prog, desc in program_edits(chosen.program or "", rng)]
        else:
            made = perturb_rationale(chosen.rationale or "", chosen.label or chosen.answer or "", rng)
            if made is not None:
                text, new_answer, desc = made
                pairs.append(_pair(chosen, text, new_answer, counterfactual=True, edit=desc))
    if pal_candidates:
        if sandbox is None:
            from reasonlite.sandbox import execute_many

            results = execute_many([p for _, p, _ in pal_candidates])
        else:
            results = sandbox.run_many([p for _, p, _ in pal_candidates])
        done: set[str] = set()
        for (chosen, prog, desc), res in zip(pal_candidates, results):
            if chosen.id in done or not res.ok or isinstance(res.value, bool):
                continue
            got = normalize_answer(res.value)
            if got is None or answers_match(got, chosen.label or chosen.answer):
                continue  # the edit did not change the answer (e.g. a number that is never used)
            done.add(chosen.id)
            pairs.append(_pair(chosen, prog, got, counterfactual=True, edit=desc))
    order = {qid: i for i, qid in enumerate(chosen_by_question)}
    pairs.sort(key=lambda p: order.get(p.example_id, 0))
    return pairs
