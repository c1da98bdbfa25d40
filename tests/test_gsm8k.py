"""GSM8K loading: gold answers, annotation-free rationales, and PAL programs verified in the sandbox."""

import time
from pathlib import Path

import pytest

from reasonlite.answers import answers_match, extract_answer
from reasonlite.data import load_gsm8k
from reasonlite.data.gsm8k import solution_to_program, solution_to_rationale
from reasonlite.sandbox import execute, execute_many

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(REPO_ROOT).parent / "shared/data/gsm8k"
needs_data = pytest.mark.skipif(not (GSM8K_DIR / "test.jsonl").exists(), reason=f"GSM8K not found at {GSM8K_DIR}")

NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
NATALIA_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?")


def test_annotations_become_a_chained_program():
    program, status = solution_to_program(NATALIA, "72", NATALIA_Q, named=False)
    assert status == "ok"
    assert program == "def solution():\n    v1 = 48 / 2\n    v2 = 48 + v1\n    return v2\n"
    assert execute(program).value == 72


def test_named_programs_bind_each_given_to_a_name_from_the_question():
    program, status = solution_to_program(NATALIA, "72", NATALIA_Q)
    assert status == "ok"
    assert program == ("def solution():\n    friends_april = 48\n    clips = friends_april / 2\n"
                       "    answer = friends_april + clips\n    return answer\n")
    assert execute(program).value == 72


def test_named_programs_name_money_per_unit_and_keep_unstated_constants():
    question = "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much?"
    solution = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
                "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")
    program, status = solution_to_program(solution, "10", question)
    assert status == "ok"
    lines = program.splitlines()
    assert lines[1:3] == ["    dollars_per_hour = 12", "    minutes_babysitting = 50"]
    assert "dollars_per_hour / 60" in program  # 60 is not in the question: it stays a literal
    assert lines[-2] == "    answer = dollars_per_minute * minutes_babysitting"
    assert execute(program).value == 10


def test_named_programs_drop_side_steps_after_the_answer():
    program, status = solution_to_program("a <<2*3=6>> b <<6+1=7>>\n#### 6", "6", "2 boxes with 3 pens each")
    assert status == "ok"
    assert program == ("def solution():\n    boxes = 2\n    pens = 3\n    answer = boxes * pens\n"
                       "    return answer\n")


def test_rationale_drops_annotations_and_ends_with_the_answer():
    rationale = solution_to_rationale(NATALIA, "72")
    assert "<<" not in rationale
    assert rationale.splitlines() == ["Natalia sold 48/2 = 24 clips in May.",
                                      "Natalia sold 48+24 = 72 clips altogether in April and May.",
                                      "The answer is 72."]


def test_broken_chains_get_no_program_and_say_why():
    assert solution_to_program("no calculator here\n#### 5", "5") == (None, "no_annotations")
    assert solution_to_program("a <<1/3=.33>> b\n#### .33", "0.33") == (None, "annotation_mismatch")
    assert solution_to_program("a <<2*3=6>> b\n#### 7", "7") == (None, "answer_not_in_chain")
    assert solution_to_program("a <<2x3=6>> b\n#### 6", "6") == (None, "bad_expression")
    # the answer may come from an earlier step when the last annotation is a side computation
    program, status = solution_to_program("a <<2*3=6>> b <<6+1=7>>\n#### 6", "6", named=False)
    assert status == "ok" and program.rstrip().endswith("return v1")


@needs_data
def test_all_test_rows_load():
    examples = load_gsm8k(GSM8K_DIR / "test.jsonl")
    assert len(examples) == 1319
    assert len({e.id for e in examples}) == 1319
    for e in examples:
        assert e.answer is not None and e.rationale.endswith(f"The answer is {e.answer}.")
        assert extract_answer(e.rationale) == e.answer
        assert (e.program is None) == (e.metadata["program_status"] != "ok")


@needs_data
def test_train_programs_execute_to_the_gold_answer_in_the_sandbox():
    started = time.perf_counter()
    examples = load_gsm8k(GSM8K_DIR, split="train")
    chained = [e for e in examples if e.metadata["program_status"] == "ok"]
    results = execute_many([e.program for e in chained])
    correct = sum(r.ok and answers_match(r.value, e.answer) for r, e in zip(results, chained, strict=True))
    elapsed = time.perf_counter() - started
    print(f"\nGSM8K train: {len(examples)} rows, {len(chained)} annotation chains, {correct} programs give the gold "
          f"answer in the sandbox ({correct / len(chained):.2%}) in {elapsed:.1f}s")
    assert len(examples) == 7473
    assert len(chained) >= 0.9 * len(examples)
    assert correct >= 0.95 * len(chained)


def test_unannotated_last_step_is_recovered_only_when_it_holds():
    solution = ("She sells 3 crafts: 3 * 12 = $<<3*12=36>>36\nShe gets $36 + $7 = $<<36+7=43>>43\n"
                "She deposits $18, leaving her with $43 - $18 = $25\n#### 25")
    program, status = solution_to_program(solution, "25", "3 crafts for 12 dollars each, 7 dollars tip, 18 deposit",
                                          named=False)
    assert status == "ok"
    assert program.splitlines()[-2:] == ["    v3 = v2 - 18", "    return v3"]
    assert solution_to_program(solution, "25", plain_equations=False) == (None, "answer_not_in_chain")
    wrong = solution.replace("= $25", "= $26").replace("#### 25", "#### 26")
    assert solution_to_program(wrong, "26") == (None, "answer_not_in_chain")
