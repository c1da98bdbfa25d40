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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reasonlite import controller
from reasonlite.budget import stated_budget
from reasonlite.controller import Ask, Detector, Generated, Plan, Sample, Solution
from reasonlite.formats import ANSWER_CUE, Format, SourceLike, build_messages

FORMATS = ("answer", "cot", "pal", "step_by_step")
STUDENT_META_FILE = "reasonlite.json"  # written by the train export: {"format": ..., "budget_conditioned": bool}


def min_budget(tokenizer) -> int:
    """Smallest usable reasoning cap: the forced answer cue alone must fit, plus one token."""
    return len(tokenizer(ANSWER_CUE, add_special_tokens=False).input_ids) + 1


# --------------------------------------------------------------------------------------------------------------------
# Raw generation: transformers `generate` with per-row stop detection
# --------------------------------------------------------------------------------------------------------------------


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
    """`reasonlite.json` of an exported student ({} when absent); for a GGUF file, the one beside it."""
    folder = Path(folder)
    path = (folder.parent if folder.is_file() else folder) / STUDENT_META_FILE
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

    def prompt(self, question: str, budget: int | None = None, sources: Sequence[SourceLike] | None = None) -> str:
        """The exact text the student sees (the chat template applied to `formats.build_messages`, with the sources'
        system message when there are sources)."""
        stated = stated_budget(budget, self.budget_conditioned, self.budget_buckets)
        messages = build_messages(question, self.fmt, budget=stated, sources=sources)
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
              stop: Sequence[str] | None = None, sources: Sequence[SourceLike] | None = None) -> Solution:
        """Answer one question. `budget` caps reasoning tokens (None = max_new_tokens); n > 1 samples and votes;
        `sources` go before the question (`formats.sources_message`)."""
        return self.solve_batch([question], budget=budget, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                early_exit=early_exit, seed=seed, stop=stop, sources=[sources])[0]

    def solve_batch(self, questions: Sequence[str], budget: int | None = None, n: int = 1, temperature: float = 0.7,
                    max_new_tokens: int = 256, early_exit: bool = True, seed: int | None = None,
                    stop: Sequence[str] | None = None, batch_size: int | None = None,
                    sources: Sequence[Sequence[SourceLike] | None] | None = None) -> list[Solution]:
        """Answer many questions, `batch_size` at a time; with n > 1, sample in rounds and vote (see module doc).
        `sources`: one list of sources (or None) per question."""
        _check_options(budget, n, temperature, max_new_tokens, self.min_budget)
        if sources is not None and len(sources) != len(questions):
            raise ValueError(f"sources has {len(sources)} entries for {len(questions)} questions: pass one per "
                             "question")
        per_question = list(sources) if sources is not None else [None] * len(questions)
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
            prompts = [self.prompt(q, budget, ctx) for q, ctx in zip(chunk, per_question[start: start + size])]
            drawn = self._sample_rounds(prompts, cap, n, temperature, early_exit, stop)
            latency = time.perf_counter() - t0
            solutions.extend(controller.vote(samples, latency) for samples in drawn)
        return solutions

    def _sample_rounds(self, prompts: list[str], cap: int, n: int, temperature: float, early_exit: bool,
                       stop: Sequence[str] | None) -> list[list[Sample]]:
        steps = controller.solve(len(prompts), self._plan(cap, temperature, n, early_exit, stop), self._count)
        return controller.run(steps, self._answer(prompts))
