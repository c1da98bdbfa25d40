"""Answer extraction, normalisation and equivalence on real-looking model outputs."""

from fractions import Fraction

import pytest

from reasonlite.answers import (
    answers_match,
    eval_arithmetic,
    extract_answer,
    format_number,
    normalize_answer,
    to_number,
)

EXTRACT_CASES = [
    # (model output, expected extracted answer)
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48 + 24 = 72 clips in total.\nThe answer is 72.", "72"),
    ("The answer is 18.", "18"),
    ("She pays 3 * $2.50 = $7.50 for apples and $4 for bread. The answer is $11.50.", "11.5"),
    ("Total cost: $1,234.50", "1234.5"),
    ("The total is $1,234.50. The answer is $1,234.50", "1234.5"),
    ("Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10", "10"),
    ("#### 72", "72"),
    ("#### 1,080", "1080"),
    ("Answer: 12 apples", "12"),
    ("answer: -7", "-7"),
    ("Final answer: 42", "42"),
    ("Final Answer: The final answer is 3.75. I hope it is correct.", "3.75"),
    ("We compute 2 + 2 = 4, then 4 * 3 = 12.\nFinal answer: **12**", "12"),
    ("So the result is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("Therefore $x = \\boxed{5}$.", "5"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("The boxed answer is \\boxed{2x+1}", "2x+1"),
    ("The temperature dropped to -5 degrees. The answer is -5.", "-5"),
    ("The temperature dropped from 3 to \u22128 degrees.", "-8"),
    ("The discount is 25%.", "25"),
    ("The answer is 25%.", "25"),
    ("The answer is 72.0", "72"),
    ("The answer is 2.50.", "2.5"),
    ("The answer is 0.50 dollars per apple.", "0.5"),
    ("The answer is 1/3.", "0.3333333333"),
    ("The answer is 1 1/2 cups.", "1.5"),
    ("The answer is: 36", "36"),
    ("The answer is x = 9.", "9"),
    ("He has 5 - 3 = 2 apples left", "2"),
    ("The answer is 15. Question: Tom has 3 cars and buys 4 more...", "15"),
    ("The answer is 15.\n\nQuestion: Mary has 7 dogs. How many legs? The answer is", "15"),
    ("I am not sure how to solve this problem.", None),
    ("", None),
    ("The answer is seven.", "7"),
    ("After 3 days she has 10 left, so she gives away 4. 6 remain", "6"),
    ("She earns $15 per hour for 8 hours: 15 * 8 = 120\nAnswer: $120", "120"),
    ("The answer is 1,000,000.", "1000000"),
    ("The answer is 3.14159", "3.14159"),
    ("**Answer:** 64", "64"),
    ("The answer is \u20ac12.", "12"),
    ("The answer is \u00a38.", "8"),
    ("The cost is 4 x 3 = 12 dollars. The answer is 12 dollars.", "12"),
    ("The final answer is $\\boxed{100}$", "100"),
    ("Answer: 0.125", "0.125"),
    ("The answer is 007.", "7"),
    ("The answer is -0.5.", "-0.5"),
    ("There are 2 + 3 = 5 red and 4 blue balls, 9 total. The answer is 9!!!", "9"),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_case_table_is_large():
    assert len(EXTRACT_CASES) >= 40


NORMALIZE_CASES = [
    ("$1,234.50", "1234.5"),
    ("2.50", "2.5"),
    ("72.0", "72"),
    ("-3", "-3"),
    ("1/2", "0.5"),
    ("= 72", "72"),
    ("45%", "45"),
    ("12 apples", "12"),
    ("\\frac{3}{8}", "0.375"),
    ("100", "100"),
    (" 18. ", "18"),
    ("-$5", "-5"),
    ("2x + 1", "2x + 1"),
    ("", None),
    (None, None),
    (72, "72"),
    (2.5, "2.5"),
    ("0.1", "0.1"),
]


@pytest.mark.parametrize("raw,expected", NORMALIZE_CASES)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "pred,gold,expected",
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("$18.00", "18", True),
        ("10.000000000000002", "10", True),
        ("17.99", "18", False),
        ("0.5", "1/2", True),
        ("2*x+1", "1+2x", True),
        ("x^2 - 1", "(x-1)*(x+1)", True),
        ("2*x+1", "2*x+2", False),
        ("sqrt(2)", "1.41421356237", True),
        ("-4", "4", False),
        (None, "4", False),
        ("apples", "4", False),
        ("1,000", "1000", True),
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_answers_match_tolerance_is_configurable():
    assert not answers_match("100.4", "100")
    assert answers_match("100.4", "100", rel_tol=1e-2)


@pytest.mark.parametrize(
    "hostile",
    [
        "__import__('os').system('echo hi')",
        "x.__class__",
        "9^9^9^9",
        "2**99999",
        "a" * 500,
        "exec(1)",
        "lambda: 1",
    ],
)
def test_symbolic_parsing_refuses_hostile_input(hostile):
    # must simply not match (and not hang, execute code or raise)
    assert answers_match(hostile, "2*y") is False


def test_to_number():
    assert to_number("$1,234.50") == 1234.5
    assert to_number("3/4") == 0.75
    assert to_number("2x+1") is None
    assert to_number("no number here") is None
    assert to_number(None) is None


def test_eval_arithmetic_is_exact_and_restricted():
    assert eval_arithmetic("0.1 + 0.2") == Fraction(3, 10)
    assert eval_arithmetic("v1 * 3", {"v1": 24}) == 72
    assert eval_arithmetic("08*2") == 16
    with pytest.raises(ValueError):
        eval_arithmetic("__import__('os')")
    with pytest.raises(ValueError):
        eval_arithmetic("2**1000")
    with pytest.raises(ValueError):
        eval_arithmetic("1/0")


def test_format_number():
    assert format_number(Fraction(5, 2)) == "2.5"
    assert format_number(72.0) == "72"
    assert format_number(Fraction(1, 3)) == "0.3333333333"
    assert format_number(-0.0) == "0"
    assert format_number(10.000000000000002) == "10"  # float noise from an executed program
    assert format_number(0.1 + 0.2) == "0.3"
    assert format_number(Fraction(-1, 8)) == "-0.125"
    assert format_number(10**30 + Fraction(1, 2)) == "1000000000000000000000000000000.5"
