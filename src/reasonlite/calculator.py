"""Decoding-time calculator for chain-of-thought students (the GSM8K calculator of Cobbe et al., 2021).

A 135M CoT student writes the right equations with the wrong results ("That leaves 150 - 125 = 45 toy cars"): it
picks operands and operations as well as a PAL student, but cannot multiply. With the calculator on, whenever a
completion ends in an arithmetic expression followed by "=", the engine computes the expression exactly
(`answers.eval_arithmetic`: an AST walk, never `eval`) and forces the result as the next tokens; the model then goes
on writing. The result follows the expression's style: "4 * $27 =" gets " $108", "4*27=" gets "108".

The same function writes the results of compressed training traces (`compress_rationale`), so the numbers a student
is trained on are the numbers the calculator will give it.

Written by hand because transformers has no tool-call hook inside `generate`; a LogitsProcessor that forces tokens is
the one extension point that keeps batching, sampling and the stopping criteria as they are.
"""

from __future__ import annotations

import re
from fractions import Fraction

from reasonlite.answers import eval_arithmetic, format_number

_NUM = r"\$?\d+(?:,\d{3})*(?:\.\d+)?%?"
_OP = r"[-+*/×÷]"
# an arithmetic expression with at least one operator, right before a final "=" (optionally followed by spaces)
_EXPR = rf"(?<![\w.$])((?:\(\s*)*{_NUM}(?:(?:\s*\))*\s*{_OP}\s*(?:\(\s*)*{_NUM})+(?:\s*\))*)"
_EXPR_AT_END = re.compile(rf"{_EXPR}(\s*)=$")
_EQUATION = re.compile(rf"{_EXPR}\s*=\s*({_NUM})")
MAX_TAIL = 240  # characters of the completion searched for the expression


def _balanced(expr: str) -> str | None:
    """Strip unmatched leading "(" / trailing ")"; None when the parentheses still do not match."""
    while expr.count("(") > expr.count(")") and expr.startswith("("):
        expr = expr[1:].lstrip()
    while expr.count(")") > expr.count("(") and expr.endswith(")"):
        expr = expr[:-1].rstrip()
    return expr if expr.count("(") == expr.count(")") else None


def evaluate_text(expr: str) -> Fraction | None:
    """Exact value of a written expression ("$108 * 25%", "17000 / 500", "(150-25*5)+4*20"); None if it has none."""
    plain = expr.replace("$", "").replace(",", "").replace("×", "*").replace("÷", "/")
    plain = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)", plain)
    try:
        return eval_arithmetic(plain)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def render(value: Fraction, money: bool) -> str:
    """How a result is written: money as "$27" / "$6.48" (cents), other numbers as `format_number` (<= 4 decimals)."""
    if money:
        cents = round(value * 100)
        return f"${cents // 100}" if cents % 100 == 0 else f"${cents / 100:.2f}"
    return format_number(value, max_decimals=4)


def _computed(match: re.Match) -> tuple[str, Fraction] | None:
    """(expression, exact value) of a matched expression (group 1); None when it has no value."""
    expr = _balanced(match.group(1).strip())
    value = evaluate_text(expr) if expr else None
    return (expr, value) if value is not None else None


def calculate(text: str) -> str | None:
    """The text the calculator inserts after `text`, or None when `text` does not end in "EXPRESSION =".

    "... sells 25 * 5 =" -> " 125"; "4 * $27 =" -> " $108"; "(150-25*5)+4*20=" -> "105".
    """
    if not text.endswith("="):
        return None
    match = _EXPR_AT_END.search(text[-MAX_TAIL:])
    computed = _computed(match) if match else None
    if computed is None:
        return None
    expr, value = computed
    spaced = bool(match.group(2))  # "a * b =" is followed by " value", "a*b=" by "value"
    return (" " if spaced else "") + render(value, money="$" in expr)


def recompute(text: str) -> str:
    """`text` with every "EXPRESSION = value" result replaced by the calculator's. Used for scripted completions,
    which are not decoded token by token; the rest of a scripted text cannot react to a corrected result."""
    out, pos = [], 0
    for match in _EQUATION.finditer(text):
        computed = _computed(match)
        if computed is None:
            continue
        expr, value = computed
        start, end = match.span(2)
        result = render(value, money="$" in expr)
        written_money = match.group(2).startswith("$")
        out.append(text[pos:start] + (result if written_money else result.lstrip("$")))
        pos = end
    return "".join(out) + text[pos:]


# ------------------------------------------------------------------------------------------------------------------
# Forcing the result inside transformers `generate`
# ------------------------------------------------------------------------------------------------------------------


def _digit_token_ids(tokenizer) -> list[int]:
    """Ids of tokens that begin with a digit (they would extend a number just written), cached per tokenizer."""
    cached = getattr(tokenizer, "_reasonlite_digit_ids", None)
    if cached is None:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        cached = [i for i, t in enumerate(tokens) if t and t[0].isdigit()]
        tokenizer._reasonlite_digit_ids = cached
    return cached


def calculator_processor(tokenizer, prompt_len: int):
    """A LogitsProcessor that, per row, forces the calculator's result after every "EXPRESSION =" it generates,
    then keeps the row from extending it: a model that expected "2550" or "9.75" would write "255" + "0" or
    "9" + ".75", so no digit may follow the result, nor follow a "." or "," right after it ("9. The" is fine)."""
    import torch
    from transformers import LogitsProcessor

    digit_ids = torch.tensor(_digit_token_ids(tokenizer), dtype=torch.long)

    class CalculatorProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self.pending: dict[int, list[int]] = {}  # row -> token ids still to force
            self.closing: dict[int, bool] = {}  # row -> True right after its result, False one token later
            self.calls = 0  # results inserted (for tests and stats)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if input_ids.shape[1] <= prompt_len:
                return scores
            for row in range(input_ids.shape[0]):
                queue = self.pending.get(row)
                if not queue and row in self.closing:
                    just_finished = self.closing.pop(row)
                    if just_finished or tokenizer.decode(input_ids[row, -1:]) in (".", ","):
                        scores[row, digit_ids.to(scores.device)] = float("-inf")
                        if just_finished:
                            self.closing[row] = False
                        continue
                if not queue:
                    # cheap test first: only a just-generated "=" can start a calculation
                    if "=" not in tokenizer.decode(input_ids[row, -1:]):
                        continue
                    text = tokenizer.decode(input_ids[row, prompt_len:], skip_special_tokens=True)
                    insert = calculate(text)
                    if not insert:
                        continue
                    queue = self.pending[row] = tokenizer(insert, add_special_tokens=False).input_ids
                    self.calls += 1
                forced = queue.pop(0)
                if not queue:
                    self.closing[row] = True
                scores[row, :] = float("-inf")
                scores[row, forced] = 0.0
            return scores

    return CalculatorProcessor()


# ------------------------------------------------------------------------------------------------------------------
# Compressed rationales (data side of the trace-budget controller)
# ------------------------------------------------------------------------------------------------------------------


_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])")


def _strip_units(expr: str) -> str:
    """"$4.50 * 40%" -> "4.5*40%": no spaces, units or trailing zeros, so equal values are equal text."""
    plain = re.sub(r"\s+", "", expr.replace("$", "").replace(",", ""))
    return _NUMBER.sub(lambda m: format_number(Fraction(m.group(0))), plain)


def _wrapped(expr: str) -> str:
    """`expr` in parentheses when it has a top-level + or - (so it can stand in for a number anywhere)."""
    depth = 0
    for i, ch in enumerate(expr):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and ch in "+-" and i > 0:
            return f"({expr})"
    return expr


def compress_rationale(rationale: str, answer: str) -> str | None:
    """The shortest form of a CoT rationale that still shows its arithmetic: its equations, with every intermediate
    result that is used exactly once inlined into the equation that uses it, written without spaces or units.

    "The store sells 25 * 5 = 125 toy cars. That leaves 150 - 125 = 25 toy cars. The delivery brings 4 * 20 = 80
    toy cars. Now there are 25 + 80 = 105. The answer is 105."
      -> "(150-25*5)+4*20=105. The answer is 105."
    None when the rationale has no equation, or the compressed arithmetic does not give `answer`.
    """
    from reasonlite.answers import answers_match
    from reasonlite.formats import answer_sentence

    body = re.split(r"(?i)the answer is", rationale)[0]
    computed = [c for c in map(_computed, _EQUATION.finditer(body)) if c is not None]
    equations = [(_strip_units(expr), render(value, money=False)) for expr, value in computed]
    if not equations:
        return None
    number = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.%])")  # a result used as an operand (not "25%")
    inline: dict[str, str] = {}  # result text -> expression to put in its place (used once later)
    kept: list[str] = []
    final_value: Fraction | None = None  # value of the last kept equation
    for i, (expr, result) in enumerate(equations):
        expr = number.sub(lambda m: inline.pop(m.group(0), m.group(0)), expr)
        later = [number.findall(e) for e, _ in equations[i + 1:]]
        uses = sum(found.count(result) for found in later)
        if uses == 1 and i < len(equations) - 1:
            inline[result] = _wrapped(expr)
        else:
            final_value = evaluate_text(expr)
            kept.append(f"{expr}={render(final_value or Fraction(0), money=False)}")
    if final_value is None or not answers_match(render(final_value, money=False), answer):
        return None
    return ". ".join(kept) + ". " + answer_sentence(answer)
