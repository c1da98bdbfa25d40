"""GSM8K from the official jsonl (``{"question", "answer"}`` with the solution text ending in ``#### 72``).

Besides the gold answer, each solution gives us two teacher signals for free:

* a rationale: the solution text without its ``<<48/2=24>>`` calculator annotations, ending "The answer is 72.";
* a PAL program: every annotation becomes one line ``v1 = 48 / 2``; a number that repeats an earlier result is
  replaced by that result's variable, so the program is a real chain of computation, not a list of constants.
  Authors often skip the calculator on the last step ("... leaving her with $43 - $18 = $25"), so on lines without
  annotations, plain ``a op b = c`` equations that hold are used as steps too.

A program is kept only when the annotations form a verified chain: each line, evaluated exactly, gives the value
the annotation states, and some line gives the gold answer. Otherwise ``program`` is None and
``metadata["program_status"]`` says why.
"""

from __future__ import annotations

import ast
import json
import re
from fractions import Fraction
from pathlib import Path

from reasonlite.answers import eval_arithmetic, normalize_answer
from reasonlite.data.example import Example
from reasonlite.data.loaders import DataError

__all__ = ["PROGRAM_STATUSES", "load_gsm8k", "solution_to_program", "solution_to_rationale"]

_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
# "43 - 18 = 25", "3 x 4 = 12": numbers joined by operators, then "=", then a number
_PLAIN_EQUATION_RE = re.compile(
    r"(?<![\w.])((?:\d+(?:\.\d+)?\s*[-+*/x×]\s*)+\d+(?:\.\d+)?)\s*=\s*(\d+(?:\.\d+)?)(?!\.?\d|[A-Za-z]|\s*[-+*/x×]\s*\d)"
)
_QUESTION_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?|\.\d+")

PROGRAM_STATUSES = {
    "ok": "annotations form a verified chain ending at the gold answer",
    "no_annotations": "the solution has no <<expr=value>> annotations",
    "bad_expression": "an annotation is not plain arithmetic or its stated value is not a number",
    "annotation_mismatch": "an annotation's expression does not evaluate to the value it states",
    "answer_not_in_chain": "no annotation computes the gold answer",
}


def _close(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= Fraction(1, 10**9) * max(1, abs(b))


class _ReuseEarlierResults(ast.NodeTransformer):
    """Replace a literal by the variable holding an earlier result with that value (latest result wins)."""

    def __init__(self, results: list[tuple[str, Fraction]], question_numbers: set[Fraction]):
        self.results = results
        self.question_numbers = question_numbers

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if not isinstance(node.value, (int, float)):
            return node
        value = Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        # a number that also appears in the question is most likely that given quantity, not a coincidence
        if value in self.question_numbers:
            return node
        for name, result in reversed(self.results):
            if result == value:
                return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)
        return node


def _annotations(solution: str, plain_equations: bool = True) -> list[str]:
    """``expr=value`` strings in solution order: calculator annotations, plus plain "20 / 4 = 5" equations on lines
    that have no annotation (GSM8K authors often skip the calculator for the last step)."""
    found: list[str] = []
    for line in solution.split("####")[0].splitlines():
        marked = _ANNOTATION_RE.findall(line)
        if marked or not plain_equations:
            found.extend(marked)
            continue
        plain = line.replace("$", "").replace(",", "")
        for expr, value in _PLAIN_EQUATION_RE.findall(plain):
            expr = re.sub(r"[x×]", "*", expr)
            # prose arithmetic is noisy ("8 x 1 1/2 = 12", "M + 4 + 2 = 8"): keep only equations that hold
            try:
                holds = _close(eval_arithmetic(expr), Fraction(value))
            except (ValueError, ZeroDivisionError, OverflowError):
                holds = False
            if holds:
                found.append(f"{expr}={value}")
    return found


def solution_to_program(solution: str, gold: str | None, question: str = "",
                        plain_equations: bool = True) -> tuple[str | None, str]:
    """Turn a GSM8K solution's calculator annotations into a PAL program; return ``(program or None, status)``.

    ``plain_equations=False`` uses the ``<<expr=value>>`` annotations only (no recovery of un-annotated steps).
    """
    annotations = _annotations(solution, plain_equations)
    if not annotations:
        return None, "no_annotations"
    question_numbers = {Fraction(n) for n in _QUESTION_NUMBER_RE.findall(question.replace(",", ""))}
    stated: list[tuple[str, Fraction]] = []  # (variable, value the annotation states) for literal reuse
    computed: dict[str, Fraction] = {}
    lines: list[str] = []
    for i, annotation in enumerate(annotations, start=1):
        expr_text, _, value_text = annotation.rpartition("=")
        name = f"v{i}"
        try:
            value = Fraction(value_text.strip().replace(",", ""))
            # strip leading zeros ("08") that Python rejects, then parse and rewrite literals into variables
            tree = ast.parse(re.sub(r"(?<![\d.])0+(?=\d)", "", expr_text.strip().replace(",", "")), mode="eval")
            tree = ast.fix_missing_locations(_ReuseEarlierResults(stated, question_numbers).visit(tree))
            expr = ast.unparse(tree)
            result = eval_arithmetic(expr, computed)
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError):
            return None, "bad_expression"
        if not _close(result, value):
            return None, "annotation_mismatch"
        stated.append((name, value))
        computed[name] = result
        lines.append(f"    {name} = {expr}")

    gold_value = Fraction(gold) if gold is not None else None
    answer_var = next((n for n in reversed(computed) if gold_value is not None and _close(computed[n], gold_value)),
                      None)
    if answer_var is None:
        return None, "answer_not_in_chain"
    return "def solution():\n" + "\n".join(lines) + f"\n    return {answer_var}\n", "ok"


def solution_to_rationale(solution: str, gold: str | None) -> str:
    """The solution text without calculator annotations, ending with "The answer is X."."""
    body = _ANNOTATION_RE.sub("", solution.split("####")[0])
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    if gold is not None:
        lines.append(f"The answer is {gold}.")
    return "\n".join(lines)


def _gold_answer(solution: str) -> str | None:
    if "####" not in solution:
        return None
    return normalize_answer(solution.rsplit("####", 1)[1].strip())


def load_gsm8k(path: str | Path, split: str = "train") -> list[Example]:
    """Read GSM8K jsonl (a file, or a folder holding ``{split}.jsonl``) into `Example`s with rationale and program."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"GSM8K file not found: {path} (fix: point to the folder with train.jsonl/test.jsonl, "
                        "by default ../shared/data/gsm8k beside the repository)")
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, solution = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{line_no}: not a GSM8K row ({exc!r}); expected JSON with "
                                "'question' and 'answer' fields") from exc
            gold = _gold_answer(solution)
            if gold is None:
                raise DataError(f"{path}:{line_no}: field 'answer' has no '#### <number>' line; "
                                "use load_examples for files in another format")
            program, status = solution_to_program(solution, gold, question)
            examples.append(Example(
                id=f"gsm8k-{path.stem}-{len(examples)}",
                question=question,
                answer=gold,
                rationale=solution_to_rationale(solution, gold),
                program=program,
                domain="math",
                metadata={"source": "gsm8k", "split": path.stem, "line": line_no, "program_status": status,
                          "steps": len(_annotations(solution))},
            ))
    return examples
