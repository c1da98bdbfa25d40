"""Program-aided augmentation: every variant re-executes to its own answer, questions carry the new numbers, and no
variant may overlap an eval question."""

import random
from fractions import Fraction

from reasonlite.data.gsm8k import solution_to_program
from reasonlite.sandbox import execute
from reasonlite.traces.augment import _distract, _write_number, augment_traces, program_givens, variants
from reasonlite.traces.overlap import ngrams
from reasonlite.traces.verify import Trace

QUESTION = ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
            "How much did she earn?")
SOLUTION = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
            "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")
SHOP_Q = "A shop has 120 mugs. It sells 35 mugs and gets 4 boxes of 12 mugs. How many mugs does it have now?"
SHOP_P = ("def solution():\n    mugs = 120\n    sold = 35\n    boxes = 4\n    per_box = 12\n"
          "    delivered = boxes * per_box\n    answer = mugs - sold + delivered\n    return answer\n")


def _trace(question: str, program: str, answer: str, i: int = 0) -> Trace:
    return Trace(id=f"q{i}#0", example_id=f"q{i}", question=question, gold=answer, label=answer, style="pal",
                 text=program, program=program, answer=answer, status="correct")


def test_givens_are_read_from_the_program():
    assert program_givens(SHOP_P) == [("mugs", 120), ("sold", 35), ("boxes", 4), ("per_box", 12)]
    assert program_givens("x = 1") is None  # no solution()


def test_variants_redraw_stated_numbers_and_recompute_the_answer():
    made, _ = variants(SHOP_Q, SHOP_P, "133", 5, random.Random(0))
    assert len(made) == 5
    for question, program, answer in made:
        assert question != SHOP_Q
        result = execute(program)
        assert result.ok and Fraction(str(result.value)) == Fraction(answer)
        givens = dict(program_givens(program))
        # the question states exactly the program's new givens, in place of the old ones
        for value in givens.values():
            assert str(int(value)) in question
        assert Fraction(answer) == givens["mugs"] - givens["sold"] + givens["boxes"] * givens["per_box"]


def test_unclean_draws_are_rejected_whole_counts_stay_whole():
    program, status = solution_to_program(
        "She sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.")
    assert status == "ok"
    made, why = variants("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                         "in May. How many clips?", program, "72", 6, random.Random(1))
    assert made and why["unclean"] > 0  # odd draws give half a clip: refused
    for _, p, answer in made:
        assert Fraction(answer).denominator == 1


def test_money_and_units_the_question_does_not_state_are_kept():
    program, _ = solution_to_program(SOLUTION, "10", QUESTION)
    made, _ = variants(QUESTION, program, "10", 3, random.Random(2))
    assert made
    for question, p, answer in made:
        assert "/ 60" in p  # minutes per hour is not a given of the question: never redrawn
        assert question.count("$") == 1 and "babysitting" in question
        assert execute(p).ok


def test_distractors_add_an_irrelevant_sentence_and_keep_the_answer():
    made, _ = variants(SHOP_Q, SHOP_P, "133", 4, random.Random(3), distractors=1.0)
    for question, program, answer in made:
        assert len(question.split(". ")) > len(SHOP_Q.split(". "))
        assert question.endswith("How many mugs does it have now?")
        assert execute(program).value == float(answer) or str(execute(program).value) == answer


def test_a_distractor_goes_between_sentences_never_after_an_abbreviation():
    question = ("A 5,300 sq. ft. house stands by a 8,100 sq. ft. house. Mr. Lee adds 2 rooms. "
                "How much bigger is it now, in sq. ft.?")
    for seed in range(20):
        out = _distract(question, set(), random.Random(seed))
        assert out.startswith("A 5,300 sq. ft. house stands by a 8,100 sq. ft. house. Mr. Lee adds 2 rooms. ")
        assert out.endswith(" How much bigger is it now, in sq. ft.?")
        assert len(out) > len(question) + 10


def test_a_whole_redraw_of_a_decimal_given_is_written_whole_and_cents_stay_cents():
    assert _write_number(Fraction(4), "4.5") == "4"
    assert _write_number(Fraction(9, 2), "4.0") == "4.5"
    assert _write_number(Fraction(2), "1.50") == "2.00"


def test_augment_traces_verifies_by_execution_and_drops_eval_overlap():
    seeds = [_trace(SHOP_Q, SHOP_P, "133", 0), _trace(QUESTION, solution_to_program(SOLUTION, "10", QUESTION)[0],
                                                      "10", 1)]
    clean, report = augment_traces(seeds, 3, seed=0)
    assert report["variants"] == len(clean) == 6 and report["dropped"]["contaminated"] == 0
    assert all(t.status == "correct" and t.id.startswith(("q0#0~aug", "q1#0~aug")) for t in clean)
    for t in clean:
        assert Fraction(str(execute(t.program).value)) == Fraction(t.answer)
    # an eval question sharing a 13-gram with the shop story removes every shop variant, and the report says so
    eval_q = "Elsewhere: It sells 35 mugs and gets 4 boxes of 12 mugs. How many mugs does it have now? Really."
    kept, report = augment_traces(seeds, 3, seed=0, eval_questions=[eval_q], contamination_ngram=8)
    assert report["dropped"]["contaminated"] == 3 and report["seeds_overlapping_eval"] == 1
    assert all(not (ngrams(t.question, 8) & ngrams(eval_q, 8)) for t in kept)
    assert {t.example_id.split("~")[0] for t in kept} == {"q1"}


def test_augment_is_deterministic_per_seed():
    seeds = [_trace(SHOP_Q, SHOP_P, "133")]
    a, _ = augment_traces(seeds, 3, seed=7)
    b, _ = augment_traces(seeds, 3, seed=7)
    c, _ = augment_traces(seeds, 3, seed=8)
    assert [t.question for t in a] == [t.question for t in b] != [t.question for t in c]


def test_plain_programs_augment_in_place_keeping_their_layout():
    """`v1 = 12 / 60` programs (data.program_names: false) state the question's numbers inline: the stated literals
    are redrawn and written back where they were; unstated constants (60 minutes an hour) stay."""
    program, status = solution_to_program(SOLUTION, "10", QUESTION, named=False)
    assert status == "ok" and "v1 = 12 / 60" in program
    made, _ = variants(QUESTION, program, "10", 3, random.Random(2))
    assert len(made) == 3
    for question, new_program, answer in made:
        assert new_program.count("\n") == program.count("\n") and "/ 60" in new_program and "given_" not in new_program
        rate, minutes = (Fraction(n) for n in (question.split("$")[1].split()[0], question.split("did ")[1].split()[0]))
        assert f"v1 = {rate} / 60" in new_program and f"v1 * {minutes}" in new_program
        assert Fraction(str(execute(new_program).value)) == Fraction(answer) == rate / 60 * minutes
    clean, report = augment_traces([_trace(QUESTION, program, "10")], 2, seed=0)
    assert report["variants"] == len(clean) == 2 and all(t.program.startswith("def solution():\n    v1 = ")
                                                          for t in clean)
