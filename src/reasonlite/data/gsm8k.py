"""GSM8K from the official jsonl (``{"question", "answer"}`` with the solution text ending in ``#### 72``).

Besides the gold answer, each solution gives us two teacher signals for free:

* a rationale: the solution text without its ``<<48/2=24>>`` calculator annotations, ending "The answer is 72.";
* a PAL program in the named style of the retail programs: each quantity the question gives becomes a variable
  named from the words around it in the question (``friends_april = 48``), every annotation one step named from the
  words after its result in the solution (``clips_may = friends_april / 2``), and the step giving the gold answer is
  ``answer``. A number that repeats an earlier result is replaced by that result's variable, so the program is a real
  chain of computation. Students trained on ``v1 = 48 / 2`` learn to combine the question's numbers by position;
  named givens make them bind each number to what it means (TinyGSM's programs read the same way).
  ``named=False`` keeps the old ``v1, v2`` form.
  Authors often skip the calculator on the last step ("... leaving her with $43 - $18 = $25"), so on lines without
  annotations, plain ``a op b = c`` equations that hold are used as steps too.

A program is kept only when the annotations form a verified chain: each line, evaluated exactly, gives the value
the annotation states, and some line gives the gold answer. Otherwise ``program`` is None and
``metadata["program_status"]`` says why.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import re
from fractions import Fraction
from pathlib import Path

from reasonlite.answers import eval_arithmetic, format_number, normalize_answer
from reasonlite.data.example import Example
from reasonlite.data.loaders import DataError
from reasonlite.jsonl import JsonlError, iter_jsonl

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
    """``expr=value`` strings in solution order (see `_annotations_in_context`)."""
    return [a for a, _, _ in _annotations_in_context(solution, plain_equations)]


def _annotations_in_context(solution: str, plain_equations: bool = True) -> list[tuple[str, str, str]]:
    """``(expr=value, text before, text after)`` in solution order: calculator annotations, plus plain "20 / 4 = 5"
    equations on lines that have no annotation (GSM8K authors often skip the calculator for the last step). The text
    after an annotation starts after its repeated result ("<<48/2=24>>24 clips in May." -> " clips in May.")."""
    found: list[tuple[str, str, str]] = []
    for line in solution.split("####")[0].splitlines():
        marked = list(_ANNOTATION_RE.finditer(line))
        if marked or not plain_equations:
            for m in marked:
                value = m.group(1).rpartition("=")[2].strip()
                after = line[m.end():]
                after = after.removeprefix(value)
                found.append((m.group(1), line[: m.start()], after))
            continue
        plain = line.replace("$", "").replace(",", "")
        for m in _PLAIN_EQUATION_RE.finditer(plain):
            expr, value = m.group(1), m.group(2)
            expr = re.sub(r"[x×]", "*", expr)
            # prose arithmetic is noisy ("8 x 1 1/2 = 12", "M + 4 + 2 = 8"): keep only equations that hold
            try:
                holds = _close(eval_arithmetic(expr), Fraction(value))
            except (ValueError, ZeroDivisionError, OverflowError):
                holds = False
            if holds:
                found.append((f"{expr}={value}", plain[: m.start()], plain[m.end():]))
    return found


# ---------------------------------------------------------------------------------------------- naming
# Words that carry no meaning in a variable name ("48 of her friends in April" -> friends_april).
_STOPWORDS = frozenset("""
a an the of in on at to for from by with and or but so than then as is are was were be been being it its it's he she
they them their there his her him we us our you your i me my this that these those which who whom what when where
how many much each every per total altogether all some any more most less if into out up down over about after before
during while just only also has have had do does did will would can could should may might must not no yes
""".split())  # noqa: SIM905 (a word list reads best as text)
_WORD_RE = re.compile(r"[A-Za-z]+")
_UNIT_WORDS = frozenset({"a", "an", "per", "each", "every"})


def _snake(words: list[str]) -> str | None:
    picked = [w.lower() for w in words if w.lower() not in _STOPWORDS and len(w) > 1][:2]
    return "_".join(picked) or None


def _context_name(after: str, before: str, money: bool, percent: bool) -> str | None:
    """A snake_case name for a quantity from the words right after it ("clips in May" -> clips_may), else the words
    right before it ("costs $100." -> costs); "$12 an hour" -> dollars_per_hour, "20% of the price" -> percent_price."""
    # a name describes this quantity only: stop at the sentence's end or at the next number
    after_words = _WORD_RE.findall(re.split(r"[.?!;:\d]", after, maxsplit=1)[0])[:5]
    name = None
    if len(after_words) >= 2 and after_words[0].lower() in _UNIT_WORDS:
        unit = _snake(after_words[1:2])
        name = f"per_{unit}" if unit else None
    if name is None:
        name = _snake(after_words)
    if name is None:
        before_words = _WORD_RE.findall(re.split(r"[.?!;:\d]", before)[-1])[-4:]
        name = _snake(before_words)
    if percent:
        name = f"percent_{name}" if name else "percent"
    elif money and (name is None or not name.startswith("dollar")):
        name = f"dollars_{name}" if name else "dollars"
    return name


class _Names:
    """Unique, valid Python identifiers (`clips_may`, `clips_may_2`, never a keyword or builtin)."""

    def __init__(self) -> None:
        self.used: set[str] = {"answer", "solution"}

    def take(self, wanted: str | None, fallback: str) -> str:
        base = wanted if wanted and wanted.isidentifier() else fallback
        if keyword.iskeyword(base) or base in dir(builtins):
            base = f"{base}_value"
        name, i = base, 2
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


_GIVEN_RE = re.compile(r"(\$?)(\d[\d,]*(?:\.\d+)?|\.\d+)(\s*%|\s+percent)?")


def question_quantities(question: str) -> list[tuple[Fraction, str, str, str, bool, bool]]:
    """Every number the question states, in order: (value, text as written, before, after, money, percent)."""
    out = []
    for m in _GIVEN_RE.finditer(question):
        text = m.group(2).replace(",", "")
        if m.group(2).endswith(","):  # "48, 12" : the comma is punctuation
            text = text.rstrip(",")
        try:
            value = Fraction(text)
        except ValueError:
            continue
        out.append((value, text, question[: m.start()], question[m.end():], bool(m.group(1)), bool(m.group(3))))
    return out


class _NameGivens(ast.NodeTransformer):
    """Replace a literal that the question states by the given's variable (created on first use)."""

    def __init__(self, givens: dict[Fraction, str]):
        self.givens = givens
        self.used: list[Fraction] = []

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
            return node
        value = Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if value not in self.givens:
            return node
        if value not in self.used:
            self.used.append(value)
        return ast.copy_location(ast.Name(id=self.givens[value], ctx=ast.Load()), node)


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name(id=self.new, ctx=node.ctx), node) if node.id == self.old else node


def solution_to_program(solution: str, gold: str | None, question: str = "",
                        plain_equations: bool = True, named: bool = True) -> tuple[str | None, str]:
    """Turn a GSM8K solution's calculator annotations into a PAL program; return ``(program or None, status)``.

    ``plain_equations=False`` uses the ``<<expr=value>>`` annotations only (no recovery of un-annotated steps);
    ``named=False`` writes ``v1 = 48 / 2`` steps with the question's numbers inline (the old form).
    """
    annotations = _annotations_in_context(solution, plain_equations)
    if not annotations:
        return None, "no_annotations"
    quantities = question_quantities(question)
    question_numbers = {q[0] for q in quantities}
    names = _Names()
    givens: dict[Fraction, str] = {}
    given_lines: dict[Fraction, str] = {}
    if named:
        for value, text, before, after, money, percent in quantities:
            if value not in givens:  # a number stated twice is one quantity (the first mention names it)
                givens[value] = names.take(_context_name(after, before, money, percent), "given")
                given_lines[value] = format_number(value)
    stated: list[tuple[str, Fraction]] = []  # (variable, value the annotation states) for literal reuse
    computed: dict[str, Fraction] = {givens[v]: v for v in givens}
    steps: list[tuple[str, ast.Expression]] = []
    used_givens: list[Fraction] = []
    for i, (annotation, before, after) in enumerate(annotations, start=1):
        expr_text, _, value_text = annotation.rpartition("=")
        try:
            value = Fraction(value_text.strip().replace(",", ""))
            # strip leading zeros ("08") that Python rejects, then parse and rewrite literals into variables
            tree = ast.parse(re.sub(r"(?<![\d.])0+(?=\d)", "", expr_text.strip().replace(",", "")), mode="eval")
            tree = _ReuseEarlierResults(stated, question_numbers).visit(tree)
            if named:
                namer = _NameGivens(givens)
                tree = namer.visit(tree)
                used_givens += [v for v in namer.used if v not in used_givens]
            tree = ast.fix_missing_locations(tree)
            result = eval_arithmetic(ast.unparse(tree), computed)
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError):
            return None, "bad_expression"
        if not _close(result, value):
            return None, "annotation_mismatch"
        money = before.rstrip().endswith("$")
        name = names.take(_context_name(after, before, money, False), f"step{i}") if named else f"v{i}"
        stated.append((name, value))
        computed[name] = result
        steps.append((name, tree))

    gold_value = Fraction(gold) if gold is not None else None
    step_names = [n for n, _ in steps]
    answer_var = next((n for n in reversed(step_names) if gold_value is not None and _close(computed[n], gold_value)),
                      None)
    if answer_var is None:
        return None, "answer_not_in_chain"
    if not named:
        lines = [f"    {n} = {ast.unparse(t)}" for n, t in steps]
        return "def solution():\n" + "\n".join(lines) + f"\n    return {answer_var}\n", "ok"
    # steps after the answer's are side computations the answer does not use; the answer step is `answer`
    steps = steps[: step_names.index(answer_var) + 1]
    rename = _Rename(answer_var, "answer")
    lines = [f"    {givens[v]} = {given_lines[v]}" for v in givens if v in used_givens]
    lines += [f"    {'answer' if n == answer_var else n} = {ast.unparse(rename.visit(t))}" for n, t in steps]
    return "def solution():\n" + "\n".join(lines) + "\n    return answer\n", "ok"


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


def load_gsm8k(path: str | Path, split: str = "train", named: bool = True) -> list[Example]:
    """Read GSM8K jsonl (a file, or a folder holding ``{split}.jsonl``) into `Example`s with rationale and program
    (``named=False``: the ``v1, v2`` program form)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"GSM8K file not found: {path} (fix: point to the folder with train.jsonl/test.jsonl, "
                        "by default ../shared/data/gsm8k beside the repository)")
    examples = []
    try:
        for line_no, row in iter_jsonl(path):
            try:
                question, solution = row["question"], row["answer"]
            except (KeyError, TypeError) as exc:  # not an object, or a field missing
                raise DataError(f"{path}:{line_no}: not a GSM8K row ({exc!r}); expected JSON with "
                                "'question' and 'answer' fields") from None
            gold = _gold_answer(solution)
            if gold is None:
                raise DataError(f"{path}:{line_no}: field 'answer' has no '#### <number>' line; "
                                "use load_examples for files in another format")
            program, status = solution_to_program(solution, gold, question, named=named)
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
    except JsonlError as exc:
        raise DataError(f"{exc}: not a GSM8K row; expected JSON with 'question' and 'answer' fields") from None
    return examples
