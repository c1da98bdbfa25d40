"""The decoding-time calculator (`reasonlite.calculator`) and compressed rationales (`budget.compress`)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from reasonlite.answers import answers_match
from reasonlite.calculator import calculate, calculator_processor, compress_rationale, evaluate_text, recompute, render
from reasonlite.config import ConfigError, build_config
from reasonlite.data.retail_math import retail_math_splits
from reasonlite.formats import ANSWER_CUE, build_messages
from reasonlite.infer import Student, hf_generate

TINY = "tiny-random-llama"


@pytest.fixture(scope="module")
def tiny():
    import torch

    from reasonlite.models import load_model

    torch.set_num_threads(1)
    return load_model(TINY, device="cpu")


# ------------------------------------------------------------------------------------------------ pure functions
@pytest.mark.parametrize("text,inserted", [
    ("The store sells 25 * 5 =", " 125"),
    ("The 4 tennis balls cost 4 * $27 =", " $108"),  # money in, money out
    ("Tax is $81 * 8% =", " $6.48"),  # percent of money, rounded to cents
    ("The markup is $4.50 * 40% =", " $1.80"),
    ("(150-25*5)+4*20=", "105"),  # no space before "=": none after it either
    ("That fills 17,000 / 500 =", " 34"),
    ("10/3=", "3.3333"),
    ("a (that is 4 * 2 =", " 8"),  # an unmatched "(" before the expression is not part of it
    ("(3 + 4) * 2 =", " 14"),
    ("leaving 3 =", None),  # no operator: nothing to compute
    ("x =", None),
    ("5 / 0 =", None),  # no value: the model writes on
    ("25 * 5 = 125", None),  # only right after "="
    ("", None),
])
def test_calculate(text, inserted):
    assert calculate(text) == inserted


def test_render_and_evaluate_text():
    assert render(Fraction(27), money=True) == "$27"
    assert render(Fraction(648, 100), money=True) == "$6.48"
    assert render(Fraction(1, 3), money=True) == "$0.33"
    assert render(Fraction(63, 10), money=False) == "6.3"
    assert evaluate_text("$108 * 25%") == 27
    assert evaluate_text("17,000 / 500") == 34
    assert evaluate_text("2 ** 1000 ** 1000") is None  # eval_arithmetic refuses huge powers instead of hanging


def test_recompute_rewrites_results_like_the_calculator_would():
    wrong = "It costs 4 * $27 = $99. The discount is $108 * 25% = $24.25. So 3*3=8, The answer is 8."
    assert recompute(wrong) == "It costs 4 * $27 = $108. The discount is $108 * 25% = $27. So 3*3=9, The answer is 8."


def test_compress_rationale_inlines_single_use_results():
    rationale = ("The store sells 25 * 5 = 125 toy cars. That leaves 150 - 125 = 25 toy cars. The delivery brings "
                 "4 * 20 = 80 toy cars. Now there are 25 + 80 = 105. The answer is 105.")
    assert compress_rationale(rationale, "105") == "(150-25*5)+4*20=105. The answer is 105."
    # a result used twice stays an equation of its own; trailing zeros go ("$4.50" -> 4.5) so values match as text
    discount = ("The 4 tennis balls cost 4 * $27 = $108. The discount is $108 * 25% = $27. After the discount: "
                "$108 - $27 = $81. Tax is $81 * 8% = $6.48. The total is $81 + $6.48 = $87.48. The answer is 87.48.")
    assert compress_rationale(discount, "87.48") == "4*27=108. 108-108*25%=81. 81+81*8%=87.48. The answer is 87.48."
    assert compress_rationale("We just know it. The answer is 4.", "4") is None  # no equations
    assert compress_rationale("2 * 3 = 6. The answer is 7.", "7") is None  # its arithmetic does not give the label


def test_every_retail_rationale_compresses_to_its_answer_and_is_shorter():
    from reasonlite.models import load_tokenizer

    tok = load_tokenizer(TINY)
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)
    examples = retail_math_splits(n_train=10, n_test=200, seed=3)["test"]
    full = short = 0
    for ex in examples:
        compressed = compress_rationale(ex.rationale, ex.answer)
        assert compressed is not None, ex.rationale
        body = compressed.split(ANSWER_CUE)[0].rstrip(". ")
        assert answers_match(render(evaluate_text(body.split(". ")[-1].split("=")[0]), money=False), ex.answer)
        full, short = full + count(ex.rationale), short + count(compressed)
    assert short < 0.6 * full  # measured 0.42 on this generator


# ------------------------------------------------------------------------------------------------ inside generate
def test_processor_forces_the_result_inside_hf_generate(tiny):
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    model, tokenizer = tiny
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Compute."}], tokenize=False,
                                           add_generation_prompt=True)
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    prompt_len = enc["input_ids"].shape[1]
    script = tokenizer("The 4 boxes cost 4 * $27 =", add_special_tokens=False).input_ids
    result_len = len(tokenizer(" $108", add_special_tokens=False).input_ids)
    zero = tokenizer("0", add_special_tokens=False).input_ids[0]
    dot = tokenizer(".", add_special_tokens=False).input_ids[0]

    class Script(LogitsProcessor):  # the random model "writes" an equation, then wants to write ".0" after the result
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_len
            if step < len(script):
                scores[:, :] = float("-inf")
                scores[:, script[step]] = 0.0
            elif step == len(script) + result_len:
                scores[:, zero] = 1e4  # "108" + "0": refused
                scores[:, dot] = 1e3  # so "." comes next
            elif step > len(script) + result_len:
                scores[:, zero] = 1e4  # "108." + "0": refused too
            return scores

    calc = calculator_processor(tokenizer, prompt_len)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=len(script) + 8, do_sample=False,
                             logits_processor=LogitsProcessorList([Script(), calc]),
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    assert text.startswith("The 4 boxes cost 4 * $27 = $108"), text
    rest = text[len("The 4 boxes cost 4 * $27 = $108"):]
    assert rest[0] == "." and not rest[1].isdigit(), text  # the result is not extended, not even past a "."
    assert calc.calls == 1


def test_calculator_tokens_count_against_the_cap(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in ("2+2?", "3*3?")]
    for gen in hf_generate(model, tokenizer, prompts, 12, 0.0, lambda t: None, calculator=True):
        assert gen.tokens <= 12


# ------------------------------------------------------------------------------------------------ the Student
def test_scripted_student_with_calculator_gets_the_arithmetic_right(tiny):
    _, tokenizer = tiny
    script = "It costs 4 * $27 = $99. Then $108 - $8 = $91. The answer is 100."

    def generate_fn(prompts, max_new_tokens, temperature, detect):
        return [script for _ in prompts]

    plain = Student(None, fmt="cot", tokenizer=tokenizer, generate_fn=generate_fn).solve("Q?")
    calc = Student(None, fmt="cot", tokenizer=tokenizer, generate_fn=generate_fn, calculator=True).solve("Q?")
    assert plain.text == script
    assert calc.text == "It costs 4 * $27 = $108. Then $108 - $8 = $100. The answer is 100."
    assert calc.answer == "100" and calc.status == "ok"


def test_calculator_is_refused_for_pal_students(tiny):
    with pytest.raises(ValueError, match="calculator=True is for cot/answer students"):
        Student(tiny, fmt="pal", calculator=True)


# ------------------------------------------------------------------------------------------------ training rows
def test_compress_adds_a_short_row_and_an_unbudgeted_full_row(tmp_path):
    from reasonlite.models import load_tokenizer
    from reasonlite.traces import Trace
    from reasonlite.train.formats_data import trace_examples

    tokenizer = load_tokenizer(TINY)
    examples = retail_math_splits(n_train=3, n_test=1, seed=0)["train"]
    traces = [Trace(id=f"t{i}", example_id=e.id, question=e.question, style="cot", text=e.rationale, rationale=e.rationale,
                    answer=e.answer, label=e.answer, status="correct") for i, e in enumerate(examples)]
    buckets = [16, 24, 32, 48, 64, 96, 128, 256]
    cfg = build_config({"student": {"model": TINY, "format": "cot"}, "traces": {"style": "cot"},
                        "budget": {"condition_training": True, "compress": True, "buckets": buckets}})
    rows, report = trace_examples(cfg.stage_view("train"), traces, tokenizer)
    assert len(rows) == 3 * len(traces) and report.used == len(traces)
    for i, ex in enumerate(examples):
        full_budgeted, full_free, short = rows[3 * i: 3 * i + 3]
        assert full_free.messages == build_messages(ex.question, "cot") and full_free.target == full_budgeted.target
        assert "Use at most" in full_budgeted.messages[-1]["content"]
        assert short.target == compress_rationale(ex.rationale, ex.answer)
        n_short = len(tokenizer(short.target, add_special_tokens=False).input_ids)
        bucket = next(b for b in buckets if n_short <= b)
        assert short.messages == build_messages(ex.question, "cot", budget=bucket)


def test_compress_needs_cot_and_condition_training():
    with pytest.raises((ConfigError, ValueError), match="budget.compress"):
        build_config({"student": {"format": "cot"}, "traces": {"style": "cot"}, "budget": {"compress": True}})
    with pytest.raises((ConfigError, ValueError), match="budget.compress"):
        build_config({"budget": {"compress": True, "condition_training": True}})  # default format pal
