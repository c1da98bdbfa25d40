"""Final answers: pull one out of model text, put it in a canonical form, and decide whether two answers agree.

Every stage that grades a student (trace verification, self-consistency voting, evaluation) goes through these
three functions, so "18", "$18.00" and "The answer is 18." count as the same answer everywhere.

Numbers are canonicalised exactly (``fractions.Fraction``), so "2.50" -> "2.5" and "72.0" -> "72" without float
noise. Symbolic answers ("2*x+1" vs "1+2x") are compared with sympy, parsed through a restricted parser: no
``sympify`` of arbitrary strings, a character allow-list, a length cap and a cap on exponents.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping
from decimal import Decimal, localcontext
from fractions import Fraction

__all__ = ["answers_match", "eval_arithmetic", "extract_answer", "format_number", "normalize_answer", "to_number"]

# ---------------------------------------------------------------------------------------------------------------
# Exact arithmetic on plain expressions ("48/2", "(1)/(2)", "v1 * 3")
# ---------------------------------------------------------------------------------------------------------------

_MAX_EXPONENT = 64  # 10**64 is already far past any word-problem answer; larger powers are a denial-of-service risk


def _to_fraction(value: float | Fraction) -> Fraction:
    # repr() keeps the decimal the author wrote (0.2 -> "0.2"), so Fraction("0.2") is exactly 1/5.
    if isinstance(value, Fraction):
        return value
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


def _eval_node(node: ast.AST, names: Mapping[str, Fraction]) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _to_fraction(node.value)
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"unknown name {node.id!r}")
        return _to_fraction(names[node.id])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _eval_node(node.operand, names)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left, names), _eval_node(node.right, names)
        op = node.op
        if isinstance(op, ast.Add):
            return left + right
        if isinstance(op, ast.Sub):
            return left - right
        if isinstance(op, ast.Mult):
            return left * right
        if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)):
            if right == 0:
                raise ValueError("division by zero")
            if isinstance(op, ast.Div):
                return left / right
            return Fraction(left // right) if isinstance(op, ast.FloorDiv) else left % right
        if isinstance(op, ast.Pow):
            if right.denominator == 1:
                if abs(right) > _MAX_EXPONENT:
                    raise ValueError(f"exponent {right} is larger than {_MAX_EXPONENT}")
                if left == 0 and right < 0:
                    raise ValueError("division by zero")
                return left ** int(right)
            if left < 0:
                raise ValueError("fractional power of a negative number")
            return Fraction(float(left) ** float(right))  # e.g. 16**0.5: inexact, compared with a tolerance later
    raise ValueError(f"unsupported syntax: {ast.dump(node)[:60]}")


def eval_arithmetic(expr: str, names: Mapping[str, int | float | Fraction] | None = None) -> Fraction:
    """Exactly evaluate ``+ - * / // % **`` over numbers and the given variables; raise ``ValueError`` otherwise.

    This never calls ``eval``: the expression is parsed to an AST and only arithmetic nodes are interpreted.
    """
    expr = re.sub(r"(?<![\d.])0+(?=\d)", "", expr.strip())  # "08" is a SyntaxError in Python 3
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from exc
    return _eval_node(tree.body, {k: _to_fraction(v) for k, v in (names or {}).items()})


def format_number(value: float | Fraction, max_decimals: int = 10) -> str:
    """Canonical text for a number: "72", "2.5", "-0.125", rounded to ``max_decimals`` places.

    Rounding makes 1/3 finite ("0.3333333333") and removes float noise from executed programs
    (10.000000000000002 -> "10"), so equal answers also have equal text (majority voting groups by text).
    """
    frac = _to_fraction(value)
    if frac.denominator == 1:
        return str(frac.numerator)
    rounded = round(frac, max_decimals)  # exact: Fraction rounding, half to even
    if rounded.denominator == 1:
        return str(rounded.numerator)
    with localcontext() as ctx:
        ctx.prec = len(str(abs(rounded.numerator))) + max_decimals + 5  # enough digits for an exact quotient
        text = format(Decimal(rounded.numerator) / Decimal(rounded.denominator), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------

_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_SIGNED_NUMBER_RE = re.compile(rf"[-+]?(?:{_NUMBER})")
# a number (or fraction, or mixed number "1 1/2") followed by a word or "%": "12 apples", "3/4 of a cup"
_LEADING_NUMBER_RE = re.compile(
    rf"^\s*([-+]?(?:\d+\s+\d+\s*/\s*\d+|(?:{_NUMBER})(?:\s*/\s*(?:{_NUMBER}))?))(?=\s+[A-Za-z]{{2}}|\s*%)"
)
_MIXED_NUMBER_RE = re.compile(r"^([-+]?)(\d+)\s+(\d+)\s*/\s*(\d+)$")
_ARITH_CHARS_RE = re.compile(r"^[\d\s.+\-*/()]+$")
_EXPR_CHARS_RE = re.compile(r"^[0-9A-Za-z_+\-*/^().\s]+$")
_MATH_WORDS = {"sqrt", "exp", "log", "sin", "cos", "tan", "Abs"}

_WORD_NUMBERS = {
    word: i
    for i, word in enumerate([
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
    ])
}
_WORD_NUMBERS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                      "ninety": 90, "hundred": 100})


def _unwrap_braced(text: str, command: str) -> str:
    """Replace ``\\command{body}`` with ``body`` (brace-matched, so nested ``\\frac{1}{2}`` survives)."""
    while (start := text.find(command + "{")) != -1:
        body_start = start + len(command) + 1
        body_end = _matching_brace(text, body_start - 1)
        if body_end is None:
            return text[:start] + text[body_start:]
        text = text[:start] + text[body_start:body_end] + text[body_end + 1:]
    return text


def _matching_brace(text: str, open_index: int) -> int | None:
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _strip_latex(s: str) -> str:
    for cmd in (r"\boxed", r"\fbox", r"\text", r"\textbf", r"\mathrm", r"\mathbf", r"\operatorname"):
        s = _unwrap_braced(s, cmd)
    # \frac{a}{b} -> (a)/(b); braces are plain groups, so after the frac rewrite they become parentheses
    s = re.sub(r"\\[dt]?frac\s*\{", r"\\frac{", s)
    while (start := s.find(r"\frac{")) != -1:
        num_end = _matching_brace(s, start + 5)
        if num_end is None or num_end + 1 >= len(s) or s[num_end + 1] != "{":
            break
        den_end = _matching_brace(s, num_end + 1)
        if den_end is None:
            break
        s = f"{s[:start]}({s[start + 6:num_end]})/({s[num_end + 2:den_end]}){s[den_end + 1:]}"
    s = re.sub(r"\\sqrt\s*\{", "sqrt{", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    replacements = {r"\left": "", r"\right": "", r"\cdot": "*", r"\times": "*", r"\div": "/", r"\pi": "pi",
                    r"\$": "$", r"\%": "%", r"\,": "", r"\!": "", r"\;": "", r"\:": "", r"\(": "", r"\)": "",
                    r"\[": "", r"\]": "", "\\": ""}
    for old, new in replacements.items():
        s = s.replace(old, new)
    s = s.replace("sqrt{", "sqrt(")
    return s.replace("{", "(").replace("}", ")")


def _clean(s: str) -> str:
    s = s.strip()
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\u00d7", "*").replace("\u00f7", "/")
    s = re.sub(r"[*_`]{2,}|^\*|\*$", "", s)  # markdown bold/italics/code around the answer
    s = _strip_latex(s) if "\\" in s or "{" in s else s
    s = re.sub(r"[$€£¥]", "", s)
    s = re.sub(r"^(?:[-+]\s+)", lambda m: m.group(0).strip(), s)  # "- 5" after dropping "$" -> "-5"
    s = s.strip().rstrip(".,;:!?").strip()
    if s.startswith("(") and s.endswith(")") and s.count("(") == 1:
        s = s[1:-1].strip()
    return s


def _number_text(s: str) -> str | None:
    """Canonical number text if ``s`` (already cleaned) is a number, a fraction, a mixed number or plain arithmetic."""
    s = s.strip().rstrip("%").strip()
    if not s:
        return None
    if (mixed := _MIXED_NUMBER_RE.match(s)) is not None:
        sign, whole, num, den = mixed.groups()
        if int(den) == 0:
            return None
        value = int(whole) + Fraction(int(num), int(den))
        return format_number(-value if sign == "-" else value)
    if re.fullmatch(rf"[-+]?(?:{_NUMBER})", s):
        return format_number(Fraction(s.replace(",", "")))
    if _ARITH_CHARS_RE.match(s) and re.search(r"\d", s) and len(s) <= 100:
        try:
            return format_number(eval_arithmetic(s.replace(",", "")))
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
    return None


def normalize_answer(s: str | float | None) -> str | None:
    """Canonical form of one answer: "$1,234.50" -> "1234.5", "72.0" -> "72", "1/2" -> "0.5", "12 apples" -> "12".

    Non-numeric answers (an expression such as "2x + 1") come back cleaned of LaTeX, markdown and surrounding
    punctuation; ``None`` or an empty string gives ``None``.
    """
    if s is None:
        return None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return format_number(s) if math.isfinite(s) else None
    text = _clean(str(s))
    if not text:
        return None
    if (number := _number_text(text)) is not None:
        return number
    if "=" in text:  # "x = 5", "= 72", "2 + 3 = 5": the value is what follows the last "="
        tail = text.rsplit("=", 1)[1].strip()
        return normalize_answer(tail) if tail else None
    if (lead := _LEADING_NUMBER_RE.match(text)) is not None:  # "12 apples", "25 percent", "3/4 of a cup"
        return _number_text(lead.group(1))
    words = text.lower().split()
    if words and words[0] in _WORD_NUMBERS and (len(words) == 1 or words[1].isalpha()):
        return str(_WORD_NUMBERS[words[0]])
    return re.sub(r"\s+", " ", text)


def to_number(s: str | float | None) -> float | None:
    """The answer as a float, or ``None`` when it is not a number (an expression, a word, nothing)."""
    text = normalize_answer(s)
    if text is None:
        return None
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Extraction from model output
# ---------------------------------------------------------------------------------------------------------------

# Highest priority first; within one marker the LAST occurrence wins (models restate, then conclude).
_MARKERS = [
    re.compile(r"final\s+answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"the\s+answer\s+is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"(?:^|[\s*])answer\s*[:=]\s*(.+)", re.IGNORECASE),
    re.compile(r"####\s*(.+)"),
]


def _first_sentence(s: str) -> str:
    s = s.strip().splitlines()[0] if s.strip() else ""
    # a period ends the sentence unless it is a decimal point ("2.5") or part of "$1,234.50"
    end = re.search(r"\.(?=\s|$)", s)
    return s[: end.start()] if end else s


def _looks_like_answer(normalized: str | None) -> bool:
    if normalized is None:
        return False
    if to_number(normalized) is not None:
        return True
    # an expression such as "2x+1" or "sqrt(2)": math characters only, at least one digit or operator, and no
    # English words (a run of 3+ letters that is not a function name means it is prose, not math)
    words = set(re.findall(r"[A-Za-z]{3,}", normalized)) - _MATH_WORDS
    return bool(_EXPR_CHARS_RE.match(normalized)) and bool(re.search(r"[\d+\-*/^]", normalized)) and \
        not words and len(normalized) <= 80


def _boxed_contents(text: str) -> list[str]:
    contents = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        end = _matching_brace(text, match.end() - 1)
        if end is not None:
            contents.append(text[match.end():end])
    return contents


def extract_answer(text: str | None) -> str | None:
    """The final answer in a model's output, normalised; ``None`` when the text holds no answer.

    Priority: "Final answer: X", "The answer is X", "Answer: X", "#### X", ``\\boxed{X}``, then the last number.
    """
    if not text:
        return None
    for marker in _MARKERS:
        for match in reversed(list(marker.finditer(text))):
            candidate = normalize_answer(_first_sentence(match.group(1)))
            if _looks_like_answer(candidate):
                return candidate
    for body in reversed(_boxed_contents(text)):
        candidate = normalize_answer(body)
        if _looks_like_answer(candidate):
            return candidate
    numbers = _SIGNED_NUMBER_RE.findall(text.replace("\u2212", "-"))
    if numbers:
        last = numbers[-1]
        # "5-3" ends with "-3" but the last number is 3; a sign only counts at the start or after a space/bracket
        if last[0] in "+-":
            pos = text.replace("\u2212", "-").rfind(last)
            if pos > 0 and not re.match(r"[\s(\[=:$]", text[pos - 1]):
                last = last[1:]
        return normalize_answer(last)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------------------------

_SYMPY_MAX_LEN = 200
_SYMPY_GLOBALS: dict | None = None


def _sympy_globals() -> dict:
    # Only these names resolve to sympy objects; every other identifier becomes a Symbol (auto_symbol), and
    # builtins are emptied so the generated code cannot reach eval/open/__import__.
    global _SYMPY_GLOBALS
    if _SYMPY_GLOBALS is None:
        import sympy

        names = ["Symbol", "Integer", "Float", "Rational", "Function", "sqrt", "pi", "E", "exp", "log", "sin",
                 "cos", "tan", "Abs"]
        _SYMPY_GLOBALS = {name: getattr(sympy, name) for name in names}
        _SYMPY_GLOBALS["ln"] = sympy.log
        _SYMPY_GLOBALS["__builtins__"] = {}
    return _SYMPY_GLOBALS


def _safe_sympy(expr: str):
    """Parse a math expression with sympy, or ``None`` when it is too long, has odd characters or fails to parse."""
    if len(expr) > _SYMPY_MAX_LEN or not _EXPR_CHARS_RE.match(expr) or "__" in expr:
        return None
    if re.search(r"[A-Za-z_)]\s*\.|\.\s*[A-Za-z_]", expr):  # attribute access such as "x.func"
        return None
    if len(re.findall(r"\^|\*\*", expr)) > 2 or re.search(r"(?:\^|\*\*)\s*\(?\s*\d{4,}", expr):
        return None  # 9^9^9 would make sympy compute a number with hundreds of millions of digits
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        return parse_expr(expr, local_dict={}, global_dict=dict(_sympy_globals()), transformations=transformations)
    except Exception:  # noqa: BLE001 - sympy raises many types (SyntaxError, TokenError, TypeError...) for bad input
        return None


def answers_match(pred: str | float | None, gold: str | float | None, rel_tol: float = 1e-6,
                  abs_tol: float = 1e-6) -> bool:
    """True when two answers are the same number (within tolerance) or the same expression (sympy)."""
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a is None or b is None:
        return False
    na, nb = to_number(a), to_number(b)
    if na is not None and nb is not None:
        return math.isclose(na, nb, rel_tol=rel_tol, abs_tol=abs_tol)
    if re.sub(r"\s+", "", a).casefold() == re.sub(r"\s+", "", b).casefold():
        return True
    ea, eb = _safe_sympy(a), _safe_sympy(b)
    if ea is None or eb is None:
        return False
    try:
        import sympy

        diff = sympy.simplify(ea - eb)
        if diff == 0:
            return True
        if not diff.free_symbols:
            scale = max(abs(float(sympy.N(eb))), 1.0) if not eb.free_symbols else 1.0
            return abs(float(sympy.N(diff))) <= max(abs_tol, rel_tol * scale)
    except Exception:  # noqa: BLE001 - symbolic failures mean "cannot show equal", never a crash in grading
        return False
    return False
