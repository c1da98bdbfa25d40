"""Program-aided augmentation: new verified problems from a verified program, no teacher needed.

A PAL program in the named style states each given quantity once (`friends_april = 48`) before its steps; a plain
one (`v1 = 48 / 2`) writes the question's numbers inline, and those literals are lifted into givens for the draw and
written back inline after it, so both forms augment alike. For a program whose givens appear as numbers in its
question:

    find the givens the question states -> redraw each (same kind: count, money, percent; same magnitude and
    granularity) -> recompute every step exactly -> keep only clean draws (no negative or fractional counts where
    the original had whole ones, money in cents) -> execute the rewritten program in the sandbox -> write the numbers
    into the question -> optionally insert an irrelevant sentence (GSM-IC) -> k verified variants per seed

Every variant is checked by execution, and none may share a word n-gram (`traces.augment.contamination_ngram`) with
any eval question: the report counts what was dropped and why.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from fractions import Fraction

from reasonlite.answers import answers_match, eval_arithmetic, format_number, normalize_answer
from reasonlite.data.gsm8k import question_quantities
from reasonlite.traces.overlap import ngrams

__all__ = ["augment_traces", "program_givens", "variants"]

_NAMES = ["Ava", "Liam", "Noah", "Mia", "Omar", "Zoe", "Ivan", "Lena", "Ravi", "Sofia", "Kenji", "Amara"]
_THINGS = ["stamps", "marbles", "books", "plants", "postcards", "coins", "puzzles", "stickers"]
# Irrelevant sentences (GSM-IC): a quantity of something the question does not ask about.
_DISTRACTORS = [
    "{name}'s neighbor has {n} {things}.",
    "Last year, {name} collected {n} {things}.",
    "A shop down the street sells {things} for ${n} each.",
    "{name} also spent {n} minutes reading that day.",
    "There are {n} {things} on a shelf nearby.",
]


# ---------------------------------------------------------------------------------------------- program side
def program_givens(program: str) -> list[tuple[str, Fraction]] | None:
    """`(name, value)` of the program's `name = <number>` lines, or None when it is not a flat `solution()`."""
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return None
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "solution"), None)
    if fn is None:
        return None
    out = []
    for stmt in fn.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.Constant) and type(stmt.value.value) in (int, float)):
            out.append((stmt.targets[0].id, Fraction(repr(stmt.value.value))))
    return out


def _step_values(program: str, values: dict[str, Fraction]) -> dict[str, Fraction] | None:
    """Every assignment's exact value in order (arithmetic only, `round(x, 2)` allowed); None if not arithmetic."""
    fn = next(n for n in ast.parse(program).body if isinstance(n, ast.FunctionDef))
    env = dict(values)
    for stmt in fn.body:
        if not isinstance(stmt, ast.Assign):
            continue
        if not (len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            return None
        if isinstance(stmt.value, ast.Constant) and stmt.targets[0].id in values:
            continue  # a given: its (redrawn) value is the one passed in
        node = stmt.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "round":
            node = node.args[0]
        try:
            env[stmt.targets[0].id] = eval_arithmetic(ast.unparse(node), env)
        except (ValueError, ZeroDivisionError, OverflowError, KeyError):
            return None
    return env


def _returned(program: str) -> str | None:
    """The variable `solution()` returns (`answer` in the named style, the last `vN` in the plain one)."""
    fn = next(n for n in ast.parse(program).body if isinstance(n, ast.FunctionDef))
    ret = next((s for s in fn.body if isinstance(s, ast.Return)), None)
    return ret.value.id if ret is not None and isinstance(ret.value, ast.Name) else None


def _with_givens(program: str, new: dict[str, Fraction]) -> str:
    lines = []
    for line in program.splitlines():
        m = re.match(r"^(\s+)([A-Za-z_]\w*) = (-?[\d.]+)\s*$", line)
        if m and m.group(2) in new:
            line = f"{m.group(1)}{m.group(2)} = {format_number(new[m.group(2)])}"
        lines.append(line)
    return "\n".join(lines) + ("\n" if program.endswith("\n") else "")


_LIFTED = "given_"  # prefix of the givens lifted out of a plain program's expressions


def _number(node: ast.AST) -> Fraction | None:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(repr(node.value))
    return None


def _inline_literals(program: str, stated: set[Fraction]) -> list[ast.Constant]:
    """The number literals inside the steps' expressions that the question states (not `name = 48` givens)."""
    fn = next(n for n in ast.parse(program).body if isinstance(n, ast.FunctionDef))
    out = []
    for stmt in fn.body:
        if isinstance(stmt, ast.Assign) and _number(stmt.value) is None:
            out += [n for n in ast.walk(stmt.value) if _number(n) in stated]
    return out


def _lift(program: str, stated: set[Fraction]) -> tuple[str, dict[str, Fraction]] | None:
    """`v1 = 48 / 2` -> `given_0 = 48; v1 = given_0 / 2` (one given per distinct stated value), or None if the
    steps hold no stated literal. The names map to the values they replaced."""
    if not _inline_literals(program, stated):
        return None
    tree = ast.parse(program)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    names: dict[Fraction, str] = {}

    class Lift(ast.NodeTransformer):
        def visit_Constant(self, node: ast.Constant) -> ast.AST:
            value = _number(node)
            if value not in stated:
                return node
            names.setdefault(value, f"{_LIFTED}{len(names)}")
            return ast.copy_location(ast.Name(id=names[value], ctx=ast.Load()), node)

    for stmt in fn.body:
        if isinstance(stmt, ast.Assign) and _number(stmt.value) is None:
            stmt.value = Lift().visit(stmt.value)
    fn.body[:0] = [ast.parse(f"{name} = {format_number(value)}").body[0] for value, name in names.items()]
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n", {name: value for value, name in names.items()}


def _inline(program: str, new: dict[Fraction, Fraction]) -> str:
    """The plain program with its stated literals rewritten to their redrawn values, in place (the text keeps its
    own layout: only the literals change)."""
    lines = program.splitlines(keepends=True)
    for node in sorted(_inline_literals(program, set(new)), key=lambda n: (n.lineno, n.col_offset), reverse=True):
        line = lines[node.lineno - 1]
        lines[node.lineno - 1] = (line[: node.col_offset] + format_number(new[_number(node)])
                                  + line[node.end_col_offset:])
    return "".join(lines)


# ---------------------------------------------------------------------------------------------- drawing numbers
def _redraw(value: Fraction, percent: bool, rng: random.Random) -> Fraction | None:
    """A plausible new value of the same kind, or None to keep this given fixed."""
    if percent:
        choices = [p for p in range(5, 100, 5) if p != value]
        return Fraction(rng.choice(choices))
    if value.denominator != 1:
        cents = value * 100
        if cents.denominator != 1:
            return None  # 1/3-like givens are rare and fragile: keep them
        unit = 25 if cents % 25 == 0 else (5 if cents % 5 == 0 else 1)
        lo, hi = max(1, int(cents / 2 / unit)), max(2, int(cents * 2 / unit))
        return Fraction(rng.randint(lo, hi) * unit, 100)
    n = int(value)
    if n <= 1 or 1900 <= n <= 2100:  # "1 hour", "in 2015": not quantities worth redrawing
        return None
    if n <= 12:
        return Fraction(rng.choice([v for v in range(2, 13) if v != n]))
    unit = 100 if n % 100 == 0 else 10 if n % 10 == 0 else 5 if n % 5 == 0 else 1
    lo, hi = max(2, n // 2 // unit), max(3, (2 * n) // unit)
    return Fraction(rng.randint(lo, hi) * unit)


def _write_number(value: Fraction, like: str) -> str:
    """`value` written the way the question wrote the original ("1.50" -> "2.25", "1,000" -> "2,500")."""
    decimals = len(like.split(".", 1)[1]) if "." in like else 0
    if "." in like and not (value.denominator == 1 and decimals != 2):  # "4.5 hours" redrawn to 4: "4 hours"
        if (value * 10**decimals).denominator != 1:
            decimals = 2
        return f"{float(value):.{decimals}f}"
    if value.denominator != 1:
        return format_number(value)
    return f"{int(value):,}" if "," in like else str(int(value))


def _clean(original: dict[str, Fraction], new: dict[str, Fraction]) -> bool:
    """Same sign everywhere, whole where the original was whole, cents where it had cents."""
    for name, old in original.items():
        value = new.get(name)
        if value is None or (old >= 0 > value) or (old > 0 and value == 0):
            return False
        if old.denominator == 1 and value.denominator != 1:
            return False
        if (old * 100).denominator == 1 and (value * 100).denominator != 1:
            return False
    return True


# A sentence ends at . ? ! before a capital, unless the word before the stop is an abbreviation ("sq. ft.", "Mr.") or
# an initial: the distractor must go between sentences, never inside "in sq. ft.?". A regex is enough here
# (no sentence splitter among the dependencies, and GSM8K questions are plain prose).
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z\"'])")
_ABBREVIATION = re.compile(r"\b(?:[A-Za-z]|sq|ft|in|yd|mi|oz|lbs?|hrs?|mins?|Mrs?|Ms|Dr|St|Jr|vs|etc|approx|[ap]\.m)\.$")


def _distract(question: str, used: set[Fraction], rng: random.Random) -> str:
    """Insert one irrelevant sentence before the question's last sentence."""
    n = rng.choice([v for v in range(2, 60) if Fraction(v) not in used])
    sentence = rng.choice(_DISTRACTORS).format(name=rng.choice(_NAMES), n=n, things=rng.choice(_THINGS))
    cuts = [m.start() for m in _SENTENCE_END.finditer(question)
            if question[m.start() - 1] != "." or not _ABBREVIATION.search(question[: m.start()])]
    if not cuts:
        return f"{sentence} {question}"
    cut = cuts[-1]
    return f"{question[:cut]} {sentence}{question[cut:]}"


def variants(question: str, program: str, answer: str, k: int, rng: random.Random, distractors: float = 0.0,
             tries: int = 20) -> tuple[list[tuple[str, str, str]], Counter]:
    """Up to `k` `(question, program, answer)` variants (answers from exact arithmetic; execution comes after),
    and a Counter of why draws were rejected."""
    why: Counter = Counter()
    givens = program_givens(program)
    quantities = question_quantities(question)
    stated = {q[0]: q for q in quantities}
    lifted = None
    if givens is not None and not any(value in stated for _, value in givens):
        lifted = _lift(program, set(stated))
    if lifted is not None:  # a plain program: draw on its lifted form, then write the new numbers back inline
        made, why = variants(question, lifted[0], answer, k, rng, distractors, tries)
        return [(q, _inline(program, {lifted[1][name]: value for name, value in program_givens(p)
                                      if name in lifted[1]}), a) for q, p, a in made], why
    if not givens:
        why["no_givens"] += 1
        return [], why
    drawable = [(name, value) for name, value in givens if value in stated]
    returned = _returned(program)
    original = _step_values(program, dict(givens))
    if not drawable or original is None or not answers_match(format_number(original.get(returned, Fraction(-1))),
                                                             answer):
        why["not_redrawable"] += 1
        return [], why
    out: list[tuple[str, str, str]] = []
    seen = {question}
    for _ in range(tries * k):
        if len(out) >= k:
            break
        new_givens = dict(givens)
        # one draw per stated number: two givens the question writes as the same number stay equal
        drawn = {value: _redraw(value, stated[value][5], rng) for value in dict.fromkeys(v for _, v in drawable)}
        for name, value in drawable:
            if drawn[value] is not None:
                new_givens[name] = drawn[value]
        values = _step_values(program, new_givens)
        if values is None or not _clean(original, values):
            why["unclean"] += 1
            continue
        by_old = {value: new_givens[name] for name, value in drawable}
        pieces, last = [], 0
        for m in re.finditer(r"\d[\d,]*(?:\.\d+)?|\.\d+", question):
            raw = m.group(0).rstrip(",")
            try:
                old = Fraction(raw.replace(",", ""))
            except ValueError:
                continue
            if old in by_old:
                pieces += [question[last: m.start()], _write_number(by_old[old], raw)]
                last = m.start() + len(raw)
        new_question = "".join(pieces) + question[last:]
        if distractors and rng.random() < distractors:
            new_question = _distract(new_question, set(values.values()), rng)
        if new_question in seen:
            why["duplicate"] += 1
            continue
        seen.add(new_question)
        out.append((new_question, _with_givens(program, new_givens), format_number(values[returned])))
    return out, why


# ---------------------------------------------------------------------------------------------- traces
def augment_traces(traces: Sequence, k: int, seed: int = 0, eval_questions: Iterable[str] = (),
                   distractors: float = 0.0, contamination_ngram: int = 13) -> tuple[list, dict]:
    """k verified variants of each correct PAL trace, as new `Trace`s, and a report of what was kept and dropped."""
    from reasonlite.sandbox import execute_many
    from reasonlite.traces.verify import Trace

    rng = random.Random(f"augment:{seed}")
    eval_grams: set[tuple[str, ...]] = set()
    for q in eval_questions:
        eval_grams |= ngrams(q, contamination_ngram)
    why: Counter = Counter()
    candidates: list[tuple[object, int, str, str, str]] = []
    seeds = [t for t in traces if t.style == "pal" and t.program and t.status == "correct"]
    for t in seeds:
        made, reasons = variants(t.question, t.program, t.answer or t.label or "", k, rng, distractors)
        why.update(reasons)
        candidates += [(t, j, q, p, a) for j, (q, p, a) in enumerate(made)]
    results = execute_many([p for _, _, _, p, _ in candidates]) if candidates else []
    out, contaminated = [], 0
    for (t, j, q, p, a), result in zip(candidates, results):
        executed = normalize_answer(result.value) if result.ok and not isinstance(result.value, bool) else None
        if executed is None or not answers_match(executed, a):
            why["exec_mismatch"] += 1
            continue
        if ngrams(q, contamination_ngram) & eval_grams:
            contaminated += 1
            continue
        out.append(Trace(id=f"{t.id}~aug{j}", example_id=f"{t.example_id}~aug{j}", question=q, gold=a, label=a,
                         domain=t.domain, style="pal", text=p, program=p, answer=executed, status="correct",
                         sample_index=t.sample_index))
    report = {"seeds": len(seeds), "variants": len(out), "per_seed": k, "distractors": distractors,
              "seeds_with_variants": len({t.example_id.split("~")[0] for t in out}),
              "dropped": {**dict(why), "contaminated": contaminated},
              "contamination_ngram": contamination_ngram,
              "seeds_overlapping_eval": sum(bool(ngrams(t.question, contamination_ngram) & eval_grams)
                                            for t in seeds)}
    return out, report
