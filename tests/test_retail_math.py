"""The seeded retail-math generator: determinism, gold signals that agree, and leak-free splits."""

import pytest

from reasonlite.answers import answers_match, extract_answer
from reasonlite.data import TEMPLATES, generate_retail_math, retail_math_splits
from reasonlite.data.retail_math import DEFAULT_HELDOUT_TEMPLATES
from reasonlite.sandbox import execute_many


def test_at_least_ten_templates_and_each_is_generated():
    assert len(TEMPLATES) >= 10
    examples = generate_retail_math(3 * len(TEMPLATES), seed=0)
    assert {e.metadata["template"] for e in examples} == set(TEMPLATES)


def test_same_seed_same_problems_and_different_seeds_differ():
    a = generate_retail_math(40, seed=7)
    b = generate_retail_math(40, seed=7)
    c = generate_retail_math(40, seed=8)
    assert [e.model_dump() for e in a] == [e.model_dump() for e in b]
    assert sum(x.question != y.question for x, y in zip(a, c, strict=True)) >= 38


def test_gold_programs_cot_and_answers_agree_for_every_template():
    examples = generate_retail_math(20 * len(TEMPLATES), seed=3)
    results = execute_many([e.program for e in examples])
    for e, r in zip(examples, results, strict=True):
        assert r.ok, (e.metadata, r.message, e.program)
        assert answers_match(r.value, e.answer), (e.program, r.value, e.answer)
        assert extract_answer(e.rationale) == e.answer
        assert e.rationale.endswith(f"The answer is {e.answer}.")
        assert e.program.startswith("def solution():") and e.program.rstrip().endswith("return answer")
        assert 2 <= e.metadata["steps"] <= 5
        assert e.domain == "retail"
        # clean answers: whole numbers or at most two decimals (cents)
        assert float(e.answer) > 0 and len(e.answer.partition(".")[2]) <= 2
    assert len({e.question for e in examples}) == len(examples)


def test_splits_hold_out_templates_and_never_share_questions():
    splits = retail_math_splits(n_train=150, n_test=60, seed=1)
    train, test, heldout = splits["train"], splits["test"], splits["test_heldout_templates"]
    assert (len(train), len(test), len(heldout)) == (150, 60, 60)
    train_templates = {e.metadata["template"] for e in train}
    assert train_templates.isdisjoint(DEFAULT_HELDOUT_TEMPLATES)
    assert {e.metadata["template"] for e in test} <= train_templates
    assert {e.metadata["template"] for e in heldout} == set(DEFAULT_HELDOUT_TEMPLATES)
    train_questions = {e.question for e in train}
    assert not train_questions & {e.question for e in test}
    assert not train_questions & {e.question for e in heldout}
    assert len({e.id for e in train + test + heldout}) == 270


def test_custom_heldout_templates_and_bad_names():
    splits = retail_math_splits(30, 10, seed=2, heldout_templates=["split_stock"])
    assert all(e.metadata["template"] != "split_stock" for e in splits["train"])
    assert {e.metadata["template"] for e in splits["test_heldout_templates"]} == {"split_stock"}
    with pytest.raises(ValueError, match="unknown"):
        generate_retail_math(3, templates=["no_such_template"])
