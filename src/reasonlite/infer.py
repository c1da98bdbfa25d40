"""Inference engine: batched generation with the trace-budget controller, PAL execution and self-consistency.

One question goes through five steps:
  1. prompt   `formats.build_messages` + the student's chat template (byte-identical to training);
  2. reason   generate up to the reasoning cap; each row stops as soon as its answer is complete (cot/answer: the
              "The answer is X." sentence; pal: the `return` line at the top level of `solution()`), on a stop string
              or on the end-of-turn token;
  3. force    rows that hit the cap without an answer get their reasoning closed and the answer cue appended
              ("The answer is" / "    return "), then generate at most `answer_tokens` more: budget forcing;
  4. execute  pal programs run in the sandbox; an exec error is a status, never an exception;
  5. vote     with n > 1 samples, a majority vote over the answers, sampled in rounds that stop once the leader
              cannot be overturned (adaptive consistency). The agreement ratio is the confidence a router uses.

Steps 2-5 are `reasonlite.controller` (the one copy, also driven by SLM-Fusion's reasoning layer); this module
answers its generation requests. The raw generation step is one function (`GenerateFn`): `hf_generate` on a
transformers model by default, or any callable with the same shape (tests feed scripted completions through the real
forcing, execution and voting code).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from reasonlite import controller
from reasonlite.budget import stated_budget
from reasonlite.controller import Ask, Plan
from reasonlite.formats import ANSWER_CUE, Format, build_messages

Status = Literal["ok", "budget_forced", "exec_error", "no_answer"]
FORMATS = ("answer", "cot", "pal", "step_by_step")
STUDENT_META_FILE = "reasonlite.json"  # written by the train export: {"format": ..., "budget_conditioned": bool}

# --------------------------------------------------------------------------------------------------------------------
# Where an answer ends (early stop) and how to force one (budget forcing)
# --------------------------------------------------------------------------------------------------------------------

_CUE_RE = re.compile(re.escape(ANSWER_CUE), re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s)|\n")  # "2.5" is not a sentence end: the period must precede whitespace
_DEF_RE = re.compile(r"^([ \t]*)def solution\s*\([^)\n]*\)\s*(?:->[^:\n]*)?:[ \t]*([^\n]*)$", re.MULTILINE)


def _sentence_end(text: str, start: int = 0) -> int | None:
    """End (exclusive) of the first sentence or line with content at or after `start`; None while it is unfinished."""
    content = re.compile(r"\S").search(text, start)
    if content is None:
        return None
    end = _SENTENCE_END_RE.search(text, content.start())
    if end is None:
        return None
    return end.end() if end.group() == "." else end.start()


def _line_end(text: str) -> int | None:
    """End of the first line with content (the forced `return ...` expression); None while it is unfinished."""
    content = re.compile(r"\S").search(text)
    if content is None:
        return None
    newline = text.find("\n", content.start())
    return newline if newline >= 0 else None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _program_end(text: str) -> int | None:
    """End of a PAL program: its top-level `return` line is finished, a closing fence, or a dedent out of the body."""
    match = _DEF_RE.search(text)
    if match is None:
        return None
    if match.group(2).strip() and not match.group(2).strip().startswith("#"):  # `def solution(): return 3`
        return match.end() if text.startswith("\n", match.end()) else None
    def_indent, body_indent = len(match.group(1)), None
    pos = match.end() + 1
    while pos <= len(text):
        newline = text.find("\n", pos)
        complete = newline >= 0
        line = text[pos: newline if complete else len(text)]
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            if stripped.startswith("```"):
                return pos  # the fence closes the program
            indent = _indent(line)
            if body_indent is None:
                if indent <= def_indent:
                    return pos  # a top-level line right after the def: nothing more belongs to the program
                body_indent = indent
            elif indent < body_indent:
                return pos  # dedent out of solution(), e.g. `print(solution())`
            if indent == body_indent and re.match(r"return\b", stripped) and complete:
                return newline
        if not complete:
            return None
        pos = newline + 1
    return None


def answer_end(text: str, fmt: Format) -> int | None:
    """Where the completion's answer is complete (cut the text there), or None if it is not complete yet."""
    if fmt == "pal":
        return _program_end(text)
    cues = list(_CUE_RE.finditer(text))
    if cues:
        end = _sentence_end(text, cues[-1].end())
        if end is not None:
            return end
    if fmt in ("answer", "step_by_step"):  # the label task answers in one line/sentence
        return _sentence_end(text)
    return None


def answer_start(text: str, fmt: Format) -> int | None:
    """Where the answer part of a finished completion starts: the last cue, or the final `return` line."""
    if fmt == "pal":
        returns = list(re.finditer(r"^[ \t]*return\b", text, re.MULTILINE))
        return returns[-1].start() if returns else None
    cues = list(_CUE_RE.finditer(text))
    return cues[-1].start() if cues else None


def force_answer(partial: str, fmt: Format) -> str:
    """The text generation continues from when the cap is hit first: the reasoning closed, then the answer cue."""
    if fmt == "pal":
        return _force_return(partial)
    if _CUE_RE.search(partial.rsplit("\n", 1)[-1]):
        return partial  # the answer sentence has begun: let it finish
    head = partial.rstrip()
    return f"{head}\n{ANSWER_CUE}" if head else ANSWER_CUE


def _force_return(partial: str) -> str:
    lines = partial.split("\n")[:-1]  # complete lines only: the unfinished last line is dropped
    def_index = next((i for i, line in enumerate(lines) if _DEF_RE.match(line)), None)
    if def_index is None:
        lines.append("def solution():")
        return "\n".join(lines) + "\n    return "
    # a block opener without its body (`for x in y:`) would make the appended return an IndentationError
    while len(lines) > def_index + 1 and (not lines[-1].strip() or lines[-1].rstrip().endswith(":")):
        lines.pop()
    body = [line for line in lines[def_index + 1:] if line.strip()]
    indent = body[0][: _indent(body[0])] if body else lines[def_index][: _indent(lines[def_index])] + "    "
    return "\n".join(lines) + f"\n{indent}return "


def min_budget(tokenizer) -> int:
    """Smallest usable reasoning cap: the forced answer cue alone must fit, plus one token."""
    return len(tokenizer(ANSWER_CUE, add_special_tokens=False).input_ids) + 1


# --------------------------------------------------------------------------------------------------------------------
# Raw generation: transformers `generate` with per-row stop detection
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Generated:
    """One raw completion: `done` means it stopped on its own (answer complete, stop string, end of turn)."""

    text: str
    tokens: int
    done: bool


Detector = Callable[[str], "int | None"]  # completion text -> cut position once it is finished, else None
GenerateFn = Callable[[list[str], int, float, Detector], "list[Generated | str]"]


def _row_watcher(tokenizer, prompt_len: int, detect: Detector, stop_ids: set[int]):
    """A StoppingCriteria that decodes each unfinished row after every step and stops the rows that are finished."""
    import torch
    from transformers import StoppingCriteria

    class RowWatcher(StoppingCriteria):
        def __init__(self) -> None:
            self.finished: dict[int, tuple[int, str]] = {}  # row -> (generated tokens, cut text)

        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            generated = input_ids[:, prompt_len:]
            n = generated.shape[1]
            rows = [i for i in range(generated.shape[0]) if i not in self.finished]
            if rows:
                texts = tokenizer.batch_decode(generated[rows], skip_special_tokens=True)
                for row, text in zip(rows, texts):
                    cut = detect(text)
                    if cut is not None:
                        self.finished[row] = (n, text[:cut])
                    elif int(generated[row, -1]) in stop_ids:  # end of turn without a complete answer
                        self.finished[row] = (n, text)
            done = [i in self.finished for i in range(generated.shape[0])]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return RowWatcher()


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end the assistant turn: eos from tokenizer and generation config, plus common end markers."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(marker) if marker in tokenizer.get_vocab() else None
        if token_id is not None:
            ids.add(token_id)
    return ids


def hf_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, detect: Detector,
                top_p: float = 1.0, calculator: bool = False) -> list[Generated]:
    """Batched (left-padded) generation; every row stops independently as soon as `detect` says it is finished.
    `calculator` forces the exact result after every "EXPRESSION =" a row writes (`reasonlite.calculator`)."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    prompt_len = enc["input_ids"].shape[1]
    stop_ids = stop_token_ids(model, tokenizer)
    watcher = _row_watcher(tokenizer, prompt_len, detect, stop_ids)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "stopping_criteria": StoppingCriteriaList([watcher]),
                              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": sorted(stop_ids)}
    if calculator:
        from reasonlite.calculator import calculator_processor

        kwargs["logits_processor"] = LogitsProcessorList([calculator_processor(tokenizer, prompt_len)])
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    generated = out[:, prompt_len:]
    results = []
    for row in range(len(prompts)):
        if row in watcher.finished:
            tokens, text = watcher.finished[row]
            results.append(Generated(text, tokens, True))
        else:  # ran to the cap: every step produced a token for this row
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            results.append(Generated(text, generated.shape[1], False))
    return results


# --------------------------------------------------------------------------------------------------------------------
# Solutions
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sampled completion after budget forcing and answer extraction/execution."""

    text: str
    reasoning_tokens: int
    answer_tokens: int
    forced: bool
    program: str | None = None
    answer: str | None = None
    status: Status = "ok"
    error: str | None = None


@dataclass
class Solution:
    """The student's answer to one question (after voting when n > 1)."""

    answer: str | None  # normalised final answer; None when no sample produced one
    status: Status  # ok | budget_forced | exec_error | no_answer (of the sample shown in `text`)
    text: str  # the completion (a sample that voted for the answer)
    program: str | None = None  # pal: the executed program
    agreement: float = 0.0  # share of samples that voted for `answer`: a confidence in [0, 1]
    samples: int = 1  # samples actually drawn (< n when adaptive consistency stopped early)
    reasoning_tokens: int = 0  # generated reasoning tokens, summed over samples
    answer_tokens: int = 0  # generated answer tokens (incl. the forced answer), summed over samples
    forced: bool = False  # the shown sample's answer came from budget forcing
    latency_s: float = 0.0  # wall time of the batch this question was solved in
    error: str | None = None  # exec error message (pal)
    votes: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.reasoning_tokens + self.answer_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def extract_answers(samples: Sequence[Any], fmt: Format) -> None:
    """Fill each sample's answer/status (objects with text, forced, program, answer, status, error fields): pal
    programs run in the sandbox in parallel, an exec error is a status; other formats are read from the text.
    Shared with SLM-Fusion's reasoning layer."""
    from reasonlite.answers import extract_answer, normalize_answer

    if fmt == "pal":
        from reasonlite.formats import extract_program
        from reasonlite.sandbox import execute_many

        for s in samples:
            s.program = extract_program(s.text)
        for s, result in zip(samples, execute_many([s.program for s in samples])):
            if result.ok:
                s.answer = normalize_answer(str(result.value)) if result.value is not None else None
            else:
                s.status, s.error = "exec_error", f"{result.error}: {result.message}"
    else:
        for s in samples:
            s.answer = extract_answer(s.text)
    for s in samples:
        if s.status == "ok":
            s.status = "no_answer" if s.answer is None else "budget_forced" if s.forced else "ok"


def _check_options(budget: int | None, n: int, temperature: float, max_new_tokens: int, floor: int) -> None:
    if n < 1:
        raise ValueError(f"n={n}: self-consistency needs at least one sample; pass n >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if budget is not None and budget < floor:
        raise ValueError(f"budget={budget} is below {floor} tokens: the forced answer cue '{ANSWER_CUE}' alone takes "
                         f"{floor - 1}; pass budget >= {floor}, or budget=None for no cap")


def read_student_meta(folder: str | os.PathLike) -> dict:
    """`reasonlite.json` of an exported student ({} when absent)."""
    path = Path(folder) / STUDENT_META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class Student:
    """A distilled student behind one call: `Student("runs/x/train/model").solve("question") -> Solution`.

    `path_or_model` is a model alias / HF folder / GGUF file, a `(model, tokenizer)` pair, or None together with
    `tokenizer=` and `generate_fn=` (a scripted student for tests). `fmt` defaults to the folder's reasonlite.json,
    else "cot". `calculator` (cot/answer) computes every "EXPRESSION =" the student writes and forces the result.
    """

    def __init__(self, path_or_model: Any, fmt: Format | None = None, device: str | None = None, *,
                 tokenizer: Any = None, generate_fn: GenerateFn | None = None, forcing: bool = True,
                 answer_tokens: int = 16, early_stop: bool = True, batch_size: int = 16, round_size: int = 3,
                 calculator: bool = False, name: str | None = None) -> None:
        meta: dict = {}
        self.model = None
        if isinstance(path_or_model, (str, os.PathLike)):
            from reasonlite.models import load_model, resolve_model_dir

            self.model, tokenizer = load_model(path_or_model, device=device)
            meta = read_student_meta(resolve_model_dir(path_or_model))
            name = name or str(path_or_model)
        elif isinstance(path_or_model, tuple):
            self.model, tokenizer = path_or_model
            loaded_from = getattr(self.model, "name_or_path", None)  # the folder load_model read, when it was one
            if loaded_from and Path(loaded_from).is_dir():
                meta = read_student_meta(loaded_from)
        elif path_or_model is not None:
            self.model = path_or_model
        if tokenizer is None:
            raise ValueError("tokenizer is required when Student gets a model object or None; pass tokenizer=...")
        if self.model is None and generate_fn is None:
            raise ValueError("Student(None, ...) needs generate_fn= (a scripted student); pass a model otherwise")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model '{name or type(self.model).__name__}' has no chat template: use a chat/instruct "
                             "model, or set tokenizer.chat_template to a Jinja template before building the Student")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.fmt: Format = fmt or meta.get("format") or "cot"
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt '{self.fmt}' is not a student format; use one of {', '.join(FORMATS)}")
        self.budget_conditioned = bool(meta.get("budget_conditioned", False))
        self.budget_buckets = meta.get("budget_buckets") or meta.get("buckets")
        self.name = name or getattr(getattr(self.model, "config", None), "name_or_path", None) or "student"
        if answer_tokens < 1:
            raise ValueError(f"answer_tokens={answer_tokens} must be >= 1 (tokens allowed for the forced answer)")
        if round_size < 1:
            raise ValueError(f"round_size={round_size} must be >= 1")
        if calculator and self.fmt == "pal":
            raise ValueError("calculator=True is for cot/answer students: a pal student's program is executed "
                             "whole in the sandbox; pass calculator=False")
        self.forcing, self.answer_tokens, self.early_stop = forcing, answer_tokens, early_stop
        self.calculator = calculator
        self.batch_size, self.round_size = batch_size, round_size
        self._generate_fn = generate_fn
        self.min_budget = min_budget(tokenizer)

    # -- prompts ------------------------------------------------------------------------------------------------------

    def prompt(self, question: str, budget: int | None = None) -> str:
        """The exact text the student sees (the chat template applied to `formats.build_messages`)."""
        stated = stated_budget(budget, self.budget_conditioned, self.budget_buckets)
        messages = build_messages(question, self.fmt, budget=stated)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- generation ---------------------------------------------------------------------------------------------------

    def _generate(self, prompts: list[str], max_new_tokens: int, temperature: float, detect: Detector) -> list[Generated]:
        if not prompts:
            return []
        if self._generate_fn is None:
            return hf_generate(self.model, self.tokenizer, prompts, max_new_tokens, temperature, detect,
                               calculator=self.calculator)
        results = []
        for out in self._generate_fn(prompts, max_new_tokens, temperature, detect):
            if isinstance(out, str):  # a scripted completion: apply the same early stop and cap as the real path
                if self.calculator:
                    from reasonlite.calculator import recompute

                    out = recompute(out)
                cut = detect(out)
                text = out[:cut] if cut is not None else out
                ids = self.tokenizer(text, add_special_tokens=False).input_ids
                over = len(ids) > max_new_tokens
                if over:
                    text = self.tokenizer.decode(ids[:max_new_tokens])
                out = Generated(text, min(len(ids), max_new_tokens), done=not over)
            results.append(out)
        return results

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids) if text else 0

    def _plan(self, cap: int, temperature: float, n: int = 1, early_exit: bool = False,
              stop: Sequence[str] | None = None) -> Plan:
        return Plan(fmt=self.fmt, cap=cap, n=n, temperature=temperature,
                    round_size=self.round_size if early_exit else None, forcing=self.forcing,
                    answer_tokens=self.answer_tokens, early_stop=self.early_stop, stop=tuple(stop or ()))

    def _answer(self, prompts: list[str]) -> Callable[[Ask], list[Generated]]:
        """The controller's generation requests, answered by this student's generate function."""
        return lambda ask: self._generate([prompts[r] + prefix for r, prefix in zip(ask.rows, ask.prefixes)],
                                          ask.max_tokens, ask.temperature, ask.detect)

    def sample(self, prompts: list[str], cap: int, temperature: float = 0.0,
               stop: Sequence[str] | None = None) -> list[Sample]:
        """Generate one completion per prompt under the reasoning cap, forcing an answer where the cap is hit."""
        steps = controller.sample(self._plan(cap, temperature, stop=stop), list(range(len(prompts))), self._count)
        return controller.run(steps, self._answer(prompts))

    # -- solving ------------------------------------------------------------------------------------------------------

    def solve(self, question: str, budget: int | None = None, n: int = 1, temperature: float = 0.7,
              max_new_tokens: int = 256, early_exit: bool = True, seed: int | None = None,
              stop: Sequence[str] | None = None) -> Solution:
        """Answer one question. `budget` caps reasoning tokens (None = max_new_tokens); n > 1 samples and votes."""
        return self.solve_batch([question], budget=budget, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                early_exit=early_exit, seed=seed, stop=stop)[0]

    def solve_batch(self, questions: Sequence[str], budget: int | None = None, n: int = 1, temperature: float = 0.7,
                    max_new_tokens: int = 256, early_exit: bool = True, seed: int | None = None,
                    stop: Sequence[str] | None = None, batch_size: int | None = None) -> list[Solution]:
        """Answer many questions, `batch_size` at a time; with n > 1, sample in rounds and vote (see module doc)."""
        _check_options(budget, n, temperature, max_new_tokens, self.min_budget)
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        cap = budget if budget is not None else max_new_tokens
        temperature = temperature if n > 1 else 0.0  # one sample is the greedy one
        size = batch_size or self.batch_size
        solutions: list[Solution] = []
        for start in range(0, len(questions), size):
            chunk = list(questions[start: start + size])
            t0 = time.perf_counter()
            per_question = self._sample_rounds([self.prompt(q, budget) for q in chunk], cap, n, temperature,
                                               early_exit, stop)
            latency = time.perf_counter() - t0
            solutions.extend(controller.vote(samples, latency) for samples in per_question)
        return solutions

    def _sample_rounds(self, prompts: list[str], cap: int, n: int, temperature: float, early_exit: bool,
                       stop: Sequence[str] | None) -> list[list[Sample]]:
        steps = controller.solve(len(prompts), self._plan(cap, temperature, n, early_exit, stop), self._count)
        return controller.run(steps, self._answer(prompts))
