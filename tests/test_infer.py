"""Inference engine: early-stop detectors, budget forcing on a real (tiny random) model, PAL execution as a status,
self-consistency voting with adaptive early exit on scripted samples, and the Student API's bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from reasonlite.controller import Generated, answer_end, answer_start, force_answer
from reasonlite.formats import ANSWER_CUE
from reasonlite.infer import Student, hf_generate

QUESTIONS = ["A shirt costs 20 dollars. How much do 3 shirts cost?", "What is 7 times 6?",
             "Tom had 12 apples and ate 5. How many are left?"]


@pytest.fixture(scope="module")
def tiny():
    import torch

    from reasonlite.models import load_model

    torch.set_num_threads(1)
    return load_model("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


# --------------------------------------------------------------------------------------------------------------------
# detectors and forcing (pure functions)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,fmt,expected", [
    ("6 * 2 = 12. The answer is 12", "cot", None),  # the answer sentence is unfinished
    ("6 * 2 = 12. The answer is 12.5", "cot", None),  # "12." could still become "12.5"
    ("6 * 2 = 12. The answer is 12. Extra", "cot", len("6 * 2 = 12. The answer is 12.")),
    ("So the answer is 12\nmore", "cot", len("So the answer is 12")),
    ("Step 1. we add. Step 2.", "cot", None),  # sentences without the cue never end a CoT
    ("The answer is 4. ", "answer", len("The answer is 4.")),
    ("4\n", "answer", 1),
    ("def solution():\n    a = 3\n    return a", "pal", None),  # return line not finished
    ("def solution():\n    a = 3\n    return a\nprint(1)", "pal", len("def solution():\n    a = 3\n    return a")),
    ("def solution():\n    def f(x):\n        return x\n    b = f(2)\n", "pal", None),  # nested return is not the end
    ("```python\ndef solution():\n    x = 1\n```\nmore", "pal", len("```python\ndef solution():\n    x = 1\n")),
    ("def solution(): return 3\n", "pal", len("def solution(): return 3")),
    ("just words\n", "pal", None),
])
def test_answer_end(text, fmt, expected):
    assert answer_end(text, fmt) == expected


def test_force_answer_closes_reasoning_with_the_cue():
    assert force_answer("First 3 * 4 = 12. Then 12 +", "cot") == f"First 3 * 4 = 12. Then 12 +\n{ANSWER_CUE}"
    assert force_answer("Then 12 + 1 = 13. The answer is 1", "cot") == "Then 12 + 1 = 13. The answer is 1"  # continues
    assert force_answer("", "answer") == ANSWER_CUE


def test_force_answer_pal_cuts_to_complete_lines_and_returns():
    partial = "def solution():\n    price = 3\n    total = price * 4\n    for i in range(3):\n    tax = tot"
    forced = force_answer(partial, "pal")
    # the unfinished line and the body-less `for` are dropped so the return compiles
    assert forced == "def solution():\n    price = 3\n    total = price * 4\n    return "
    assert force_answer("Let me think about it\nstill thinking", "pal").endswith("def solution():\n    return ")
    assert answer_start("def solution():\n    x = 1\n    return x", "pal") == len("def solution():\n    x = 1\n")


# --------------------------------------------------------------------------------------------------------------------
# budget forcing on a real model
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["cot", "pal", "answer"])
def test_budget_forcing_stays_within_cap_and_always_yields_an_answer_field(tiny, fmt):
    student = Student(tiny, fmt=fmt, answer_tokens=5)
    cap = 6
    solutions = student.solve_batch(QUESTIONS, budget=cap)
    assert len(solutions) == len(QUESTIONS)
    for sol in solutions:
        assert sol.reasoning_tokens <= cap and sol.answer_tokens <= 5
        assert 0 < sol.tokens <= cap + 5
        # a random model never finishes on its own: every row hits the cap and is forced
        assert sol.forced
        if fmt == "pal":
            assert "def solution():" in sol.program and "\n    return " in sol.text
            assert sol.status in ("budget_forced", "exec_error", "no_answer")
        else:
            assert ANSWER_CUE in sol.text.splitlines()[-1] or ANSWER_CUE in sol.text


def test_no_budget_caps_at_max_new_tokens_and_forcing_can_be_switched_off(tiny):
    forced = Student(tiny, fmt="cot", answer_tokens=4).solve(QUESTIONS[0], max_new_tokens=7)
    assert forced.reasoning_tokens == 7 and forced.forced and ANSWER_CUE in forced.text
    plain = Student(tiny, fmt="cot", forcing=False).solve(QUESTIONS[0], max_new_tokens=7)
    assert plain.reasoning_tokens == 7 and plain.answer_tokens == 0 and not plain.forced


def test_rows_stop_independently_in_one_batch(tiny):
    model, tok = tiny
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]

    def detect(text: str):
        # stop a row once it has produced more than 8 characters: rows reach that at different steps
        return len(text) if len(text) > 8 else None

    out = hf_generate(model, tok, prompts, max_new_tokens=40, temperature=0.0, detect=detect)
    for gen in out:
        assert isinstance(gen, Generated)
        assert gen.done and gen.tokens < 40 and len(gen.text) > 8
    full = hf_generate(model, tok, prompts[:1], max_new_tokens=out[0].tokens, temperature=0.0, detect=lambda t: None)
    assert not full[0].done and full[0].tokens == out[0].tokens


def test_real_self_consistency_path(tiny):
    student = Student(tiny, fmt="cot", answer_tokens=3)
    sol = student.solve(QUESTIONS[1], budget=5, n=3, temperature=1.0, seed=0)
    assert 1 <= sol.samples <= 3
    assert 0.0 <= sol.agreement <= 1.0
    assert sol.tokens <= sol.samples * (5 + 3)
    again = student.solve(QUESTIONS[1], budget=5, n=3, temperature=1.0, seed=0)
    assert again.text == sol.text  # seeded sampling is reproducible


# --------------------------------------------------------------------------------------------------------------------
# scripted students: voting, early exit, PAL execution, stop strings
# --------------------------------------------------------------------------------------------------------------------


class Script:
    """A generate_fn that answers each question with the next completion of its script (and records calls)."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts = {q: list(s) for q, s in scripts.items()}
        self.calls: list[tuple[int, float]] = []

    def __call__(self, prompts, max_new_tokens, temperature, detect):
        self.calls.append((len(prompts), temperature))
        out = []
        for prompt in prompts:
            question = next(q for q in self.scripts if q in prompt)
            out.append(self.scripts[question].pop(0))
        return out


@pytest.fixture
def scripted(tokenizer):
    def make(scripts, fmt="cot", **kw):
        script = Script(scripts)
        return Student(None, fmt=fmt, tokenizer=tokenizer, generate_fn=script, **kw), script
    return make


def test_vote_with_adaptive_early_exit(scripted):
    unanimous = [f"{ANSWER_CUE} 5."] * 5
    split = [f"{ANSWER_CUE} {a}." for a in (5, 7, 5, 7, 5)]
    student, script = scripted({"Q1?": unanimous, "Q2?": split}, round_size=3)
    first, second = student.solve_batch(["Q1?", "Q2?"], n=5, temperature=0.8)
    # Q1: 3 of 3 agree after the first round -> the 2 remaining samples cannot overturn it
    assert (first.answer, first.samples, first.agreement) == ("5", 3, 1.0)
    # Q2: 2-1 after round one is open; round two gives 3-2
    assert (second.answer, second.samples, second.agreement, second.votes) == ("5", 5, 0.6, {"5": 3, "7": 2})
    assert script.calls == [(6, 0.8), (2, 0.8)]  # round 1: both questions x3; round 2: only Q2 x2


def test_vote_without_early_exit_draws_all_samples(scripted):
    student, script = scripted({"Q1?": [f"{ANSWER_CUE} 5."] * 4 + [f"{ANSWER_CUE} 9."]})
    sol = student.solve("Q1?", n=5, early_exit=False, temperature=0.5)
    assert (sol.answer, sol.samples, sol.agreement) == ("5", 5, 0.8)
    assert script.calls == [(5, 0.5)]


def test_single_sample_is_greedy(scripted):
    student, script = scripted({"Q1?": [f"{ANSWER_CUE} 5."]})
    sol = student.solve("Q1?", temperature=0.9)
    assert script.calls == [(1, 0.0)] and sol.answer == "5" and sol.agreement == 1.0 and sol.status == "ok"


def test_pal_exec_errors_are_a_status(scripted):
    programs = {
        "ok?": ["def solution():\n    price = 4\n    return price * 3\n"],
        "zero?": ["def solution():\n    return 1 / 0\n"],
        "syntax?": ["def solution():\n    return (1 +\n\n"],
        "forbidden?": ["def solution():\n    import os\n    return os.getcwd()\n"],
    }
    student, _ = scripted(programs, fmt="pal")
    ok, zero, syntax, forbidden = student.solve_batch(list(programs))
    assert (ok.status, ok.answer, ok.program.startswith("def solution")) == ("ok", "12", True)
    for sol in (zero, syntax, forbidden):
        assert sol.status == "exec_error" and sol.answer is None and sol.error
    assert zero.error.startswith("runtime") and forbidden.error.startswith("forbidden")


def test_pal_vote_over_executed_values(scripted):
    a, b = "def solution():\n    return 10 / 4\n", "def solution():\n    return 2.5\n"
    student, _ = scripted({"Q?": [a, "def solution():\n    return 1/0\n", b]}, fmt="pal")
    sol = student.solve("Q?", n=3, early_exit=False)
    assert sol.answer == "2.5" and sol.votes == {"2.5": 2} and sol.agreement == pytest.approx(2 / 3)


def test_early_stop_and_stop_strings_cut_the_text(scripted):
    student, _ = scripted({"Q?": ["3 + 4 = 7. The answer is 7. And then I kept talking for a long while."],
                           "S?": ["Step one. STOP The answer is 3."]})
    sol = student.solve("Q?")
    assert sol.text == "3 + 4 = 7. The answer is 7." and sol.answer == "7" and not sol.forced
    assert sol.answer_tokens > 0 and sol.reasoning_tokens > 0
    stopped = student.solve("S?", stop=["STOP"])
    assert stopped.text == "Step one. " and stopped.status == "no_answer"


def test_scripted_forcing_uses_the_answer_cue(scripted, tokenizer):
    long_reasoning = " ".join(["and then we add some more numbers"] * 20)
    student, _script = scripted({"Q?": [long_reasoning, " 42."]}, answer_tokens=4)
    sol = student.solve("Q?", budget=10)
    assert sol.forced and sol.status == "budget_forced" and sol.answer == "42"
    assert sol.reasoning_tokens == 10 and sol.text.endswith(f"{ANSWER_CUE} 42.")


# --------------------------------------------------------------------------------------------------------------------
# bad input, model folders, lazy import
# --------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_have_clear_errors(tiny, tokenizer):
    student = Student(tiny, fmt="cot")
    with pytest.raises(ValueError, match=r"budget=2 .*budget >= 4"):
        student.solve("Q?", budget=2)
    with pytest.raises(ValueError, match=r"n=0"):
        student.solve("Q?", n=0)
    with pytest.raises(ValueError, match="unknown|not a student format"):
        Student(tiny, fmt="essay")
    no_template = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        Student((tiny[0], no_template))


def test_student_reads_reasonlite_json(tmp_path):
    from reasonlite.models import resolve_model_dir

    src = resolve_model_dir("tiny-random-llama")
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "reasonlite.json").write_text(json.dumps({"format": "pal", "budget_conditioned": True,
                                                          "budget_buckets": [32, 64]}))
    student = Student(str(tmp_path))
    assert student.fmt == "pal" and student.budget_conditioned
    assert "Use at most 32 tokens." in student.prompt("Q?", budget=50)
    assert "Use at most" not in student.prompt("Q?")
    assert Student(str(src)).fmt == "cot"  # no reasonlite.json: the default
    from reasonlite.models import load_model

    pair = Student(load_model(str(tmp_path)))  # a (model, tokenizer) pair loaded from the folder reads it too
    assert pair.fmt == "pal" and pair.budget_conditioned and pair.budget_buckets == [32, 64]


def test_import_reasonlite_stays_light():
    code = "import sys, reasonlite; assert 'torch' not in sys.modules; print(reasonlite.Student.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Student"


def test_controller_off_does_not_cut_after_the_answer(scripted):
    student, _ = scripted({"Q?": ["The answer is 7. And then more talk."]}, early_stop=False)
    sol = student.solve("Q?")
    assert sol.text == "The answer is 7. And then more talk." and sol.answer == "7" and not sol.forced
