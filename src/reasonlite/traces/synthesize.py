"""Teacher synthesis, the TinyGSM recipe: an LLM teacher writes NEW problems, each with a program, from seed problems.

    seeds (training examples whose gold program runs to the gold answer, the first `max_seeds`)
      -> one prompt per (seed, op): the op's instruction, a worked example, the seed's problem and program
      -> the teacher's replies "Problem: ...\\n```python\\ndef solution(): ...```" (SQLite cache first)
      -> parse -> execute every program in one sandbox batch -> filter -> `Example`s (answer = the executed result)

A seed's j-th new problem uses op `ops[(seed_index + j) % len(ops)]`, so the ops take turns even with `per_seed` 1; the
problems one op gets from one seed are the k samples of that (seed, op) prompt. Filters, in this order, each counted
in the report under its reason:
  teacher_error       the teacher's response was malformed (not cached, asked again next run)
  unparsed            no "Problem:" text or no `def solution()` in the reply
  not_executable      the program failed in the sandbox (syntax, forbidden, timeout, runtime ...)
  non_numeric         solution() returned nothing, a bool or text
  list_answer         solution() returned a list / tuple / set / dict
  eval_overlap        the problem shares a word `contamination_ngram`-gram with an eval question
  near_duplicate      word-trigram Jaccard >= `dedup_threshold` with its seed or with a problem kept before it
"""

from __future__ import annotations

import ast
import asyncio
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from reasonlite.answers import answers_match, normalize_answer
from reasonlite.config import ReasonLiteConfig, StageView
from reasonlite.data.example import Example
from reasonlite.formats import extract_program
from reasonlite.teachers import CompletionCache, TeacherPrompt, complete_cached, make_teacher
from reasonlite.traces.overlap import jaccard, ngrams

DEDUP_NGRAM = 3
DROP_REASONS = ("teacher_error", "unparsed", "not_executable", "non_numeric", "list_answer", "eval_overlap",
                "near_duplicate")
# the synthesis teacher is built without the hf pal prefill ("```python\ndef solution():"): its reply starts with
# the new problem, not with code
TEACHER_STYLE = "cot"

SYSTEM = ("You write new math word problems for students, each with a Python program that solves it. You are given "
          "a seed problem with its program and an operation to apply. Reply with the new problem after 'Problem:', "
          "then a ```python block with a function `def solution():` that computes the answer from the quantities in "
          "the new problem (one step per line, descriptive variable names) and returns the final number.")

# The worked example every op prompt shows first: this seed, then the op applied to it.
EXAMPLE_SEED = Example(
    id="worked-example",
    question="A store sells notebooks for $3 each. Maya buys 4 notebooks and pays with a $20 bill. "
             "How much change does she get?",
    answer="8",
    program="def solution():\n    notebook_price = 3\n    notebooks = 4\n    paid = 20\n"
            "    cost = notebooks * notebook_price\n    change = paid - cost\n    return change",
)


@dataclass(frozen=True)
class Op:
    instruction: str
    example_problem: str  # EXAMPLE_SEED with the op applied
    example_program: str


# keys = config.SynthesisOp (a test checks they agree)
OPS: dict[str, Op] = {
    "rephrase": Op(
        "Rephrase the problem in different words. Keep every number, the story and the answer.",
        "Maya picks out 4 notebooks priced at $3 apiece and hands the cashier a $20 bill. "
        "What change should she receive?",
        EXAMPLE_SEED.program),
    "new_numbers": Op(
        "Change the numbers to new, sensible values. Keep the story and the steps.",
        "A store sells notebooks for $5 each. Maya buys 7 notebooks and pays with a $50 bill. "
        "How much change does she get?",
        "def solution():\n    notebook_price = 5\n    notebooks = 7\n    paid = 50\n"
        "    cost = notebooks * notebook_price\n    change = paid - cost\n    return change"),
    "new_story": Op(
        "Write a problem about a different situation that is solved with the same steps.",
        "A farmer has 30 kilograms of apples. He fills 6 crates with 4 kilograms each. "
        "How many kilograms of apples are left?",
        "def solution():\n    apples_kg = 30\n    crates = 6\n    kg_per_crate = 4\n"
        "    packed = crates * kg_per_crate\n    left = apples_kg - packed\n    return left"),
    "extra_step": Op(
        "Make the problem need one more step: add one quantity and one operation.",
        "A store sells notebooks for $3 each and pens for $2 each. Maya buys 4 notebooks and 3 pens and pays "
        "with a $20 bill. How much change does she get?",
        "def solution():\n    notebook_price = 3\n    notebooks = 4\n    pen_price = 2\n    pens = 3\n"
        "    paid = 20\n    cost = notebooks * notebook_price + pens * pen_price\n    change = paid - cost\n"
        "    return change"),
    "irrelevant_context": Op(
        "Add a sentence with a number that is not needed to solve the problem. The answer stays the same.",
        "A store sells notebooks for $3 each. The store has been open for 12 years. Maya buys 4 notebooks and "
        "pays with a $20 bill. How much change does she get?",
        EXAMPLE_SEED.program),
}


def render_reply(problem: str, program: str) -> str:
    """A synthesis reply in the format `parse_synthesis` reads (the worked examples use it)."""
    return f"Problem: {problem.strip()}\n```python\n{program.strip()}\n```"


def _op_request(question: str, program: str, op: str) -> str:
    return (f"Operation: {op.replace('_', ' ')}. {OPS[op].instruction}\n\n"
            f"Seed problem: {question.strip()}\n"
            f"Seed program:\n```python\n{program.strip()}\n```")


def synthesis_messages(seed: Example, op: str) -> list[dict]:
    """System instruction, the op's worked example (user/assistant turn), then the op applied to `seed`."""
    if op not in OPS:
        raise ValueError(f"unknown traces.synthesize.ops entry '{op}': use one of {', '.join(OPS)}")
    worked = OPS[op]
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": _op_request(EXAMPLE_SEED.question, EXAMPLE_SEED.program, op)},
            {"role": "assistant", "content": render_reply(worked.example_problem, worked.example_program)},
            {"role": "user", "content": _op_request(seed.question, seed.program or "", op)}]


# "Problem: ...", also "**New problem:** ..." / "Question: ..."; the text runs up to the code
_PROBLEM_RE = re.compile(r"(?:^|\n)[\s*#_>-]*(?:new\s+)?(?:problem|question)[\s*_]*:[\s*_]*(.*?)"
                         r"(?=```|\n\s*def solution|$)", re.IGNORECASE | re.DOTALL)


def parse_synthesis(text: str) -> tuple[str, str] | None:
    """(question, program) from a reply; None when the problem text or `def solution()` is missing."""
    text = (text or "").strip()
    m = _PROBLEM_RE.search(text)
    if m is None:
        return None
    question = " ".join(m.group(1).split())
    program = extract_program(text[m.end():])
    if not question or "def solution" not in program:
        return None
    return question, program


# ------------------------------------------------------------------------------------------------------------------
# Overlap: word n-grams (lowercase words and numbers; punctuation and "$" ignored)
# ------------------------------------------------------------------------------------------------------------------

class NearDuplicates:
    """The kept problems' trigram sets, indexed by trigram, so a new problem is compared only with those it shares
    a trigram with."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._sizes: list[int] = []
        self._index: dict[tuple, list[int]] = defaultdict(list)

    def near(self, grams: set) -> bool:
        shared = Counter(j for g in grams for j in self._index.get(g, ()))
        return any(c / (len(grams) + self._sizes[j] - c) >= self.threshold for j, c in shared.items())

    def add(self, grams: set) -> None:
        for g in grams:
            self._index[g].append(len(self._sizes))
        self._sizes.append(len(grams))


# the sandbox refuses container results as a runtime error ("result is a list, not a single answer")
_CONTAINER_RESULT_RE = re.compile(r"result is an? (?:list|tuple|dict|set|frozenset|range)\b")


def drop_reason(result) -> str | None:
    """None when a sandbox result is a numeric scalar; else why the problem is dropped."""
    if not result.ok:
        return "list_answer" if _CONTAINER_RESULT_RE.match(result.message or "") else "not_executable"
    value = result.value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    if isinstance(value, str):  # a container that reached us as its str()
        try:
            if isinstance(ast.literal_eval(value), (list, tuple, set, dict)):
                return "list_answer"
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return "non_numeric"


# ------------------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------------------

def _run(codes: list[str]) -> list:
    from reasonlite.sandbox import execute_many

    return execute_many(codes) if codes else []


def pick_seeds(examples: list[Example], max_seeds: int | None) -> list[Example]:
    """The first `max_seeds` examples whose gold program runs to a number matching their gold answer (if any)."""
    candidates = [ex for ex in examples if ex.program and "def solution" in ex.program]
    seeds: list[Example] = []
    start = 0
    while start < len(candidates) and (max_seeds is None or len(seeds) < max_seeds):
        chunk = candidates[start:start + (len(candidates) if max_seeds is None else max_seeds - len(seeds))]
        start += len(chunk)
        for ex, result in zip(chunk, _run([ex.program for ex in chunk])):
            if drop_reason(result) is None and (
                    ex.answer is None or answers_match(normalize_answer(result.value), ex.answer)):
                seeds.append(ex)
    return seeds


def _plan(seeds: list[Example], ops: list[str], per_seed: int) -> dict[tuple[int, str], int]:
    """(seed index, op) -> number of new problems: op of seed i's j-th problem is ops[(i + j) % len(ops)]."""
    plan: Counter = Counter()
    for i in range(len(seeds)):
        for j in range(per_seed):
            plan[(i, ops[(i + j) % len(ops)])] += 1
    return dict(plan)


async def _ask(teacher, cache, prompts_by_k: dict[int, list[TeacherPrompt]]):
    """complete_cached once per sample count k (prompts of one op for one seed share k)."""
    out, stats = {}, []
    try:
        for k, prompts in prompts_by_k.items():
            out[k], s = await complete_cached(teacher, cache, prompts, k)
            stats.append(s.as_dict())
    finally:
        client = getattr(teacher, "client", None)
        if client is not None:  # close the HTTP pool on the loop that opened it
            await client.close()
    total = {key: sum(s[key] for s in stats) for key in ("hits", "misses", "calls", "teacher_errors")}
    return out, total


def synthesize(cfg: ReasonLiteConfig | StageView, examples: list[Example], eval_questions: list[str],
               cache_path: str | Path | None = None) -> tuple[list[Example], dict]:
    """New problems from the verified seeds among `examples`, filtered; returns (new examples, report).

    `eval_questions` are what no new problem may overlap; `cache_path` defaults to the traces stage's teacher cache.
    Reads only the traces stage's view of `cfg`.
    """
    cfg = cfg.stage_view("traces")
    sc = cfg.traces.synthesize
    seeds = pick_seeds(examples, sc.max_seeds)
    plan = _plan(seeds, list(sc.ops), sc.per_seed)
    prompts_by_k: dict[int, list[TeacherPrompt]] = defaultdict(list)
    for (i, op), k in plan.items():
        prompts_by_k[k].append(TeacherPrompt(synthesis_messages(seeds[i], op), seeds[i]))

    if cache_path is None:
        from reasonlite.traces.build import default_cache_path

        cache_path = default_cache_path(cfg)
    teacher = make_teacher(cfg.teacher, style=TEACHER_STYLE, seed=cfg.data.seed)
    cache = CompletionCache(cache_path)
    try:
        completions, cache_stats = asyncio.run(_ask(teacher, cache, dict(prompts_by_k)))
    finally:
        cache.close()
    iter_by_k = {k: iter(rows) for k, rows in completions.items()}
    replies = {key: next(iter_by_k[k]) for key, k in plan.items()}  # back in plan order: seed, then op turn

    # parse every reply, then execute every parsed program in one sandbox batch
    dropped: Counter = Counter()
    parsed: list[tuple[Example, str, int, str, str]] = []  # seed, op, sample index, question, program
    for (i, op), row in replies.items():
        for s, completion in enumerate(row):
            if completion.error is not None:
                dropped["teacher_error"] += 1
            elif (got := parse_synthesis(completion.text)) is None:
                dropped["unparsed"] += 1
            else:
                parsed.append((seeds[i], op, s, *got))
    results = _run([p[4] for p in parsed])

    eval_grams = set().union(*(ngrams(q, sc.contamination_ngram) for q in eval_questions))
    kept_so_far = NearDuplicates(sc.dedup_threshold)
    synthesized: list[Example] = []
    for (seed, op, s, question, program), result in zip(parsed, results):
        if (reason := drop_reason(result)) is not None:
            dropped[reason] += 1
            continue
        if ngrams(question, sc.contamination_ngram) & eval_grams:
            dropped["eval_overlap"] += 1
            continue
        grams = ngrams(question, DEDUP_NGRAM)
        if jaccard(grams, ngrams(seed.question, DEDUP_NGRAM)) >= sc.dedup_threshold or kept_so_far.near(grams):
            dropped["near_duplicate"] += 1
            continue
        kept_so_far.add(grams)
        synthesized.append(Example(
            id=f"synth-{seed.id}-{op}-{s}", question=question, answer=normalize_answer(result.value),
            program=program, domain=seed.domain, metadata={"source": "synthesized", "op": op, "seed_id": seed.id}))

    report = {
        "enabled": True,
        "ops": list(sc.ops),
        "per_seed": sc.per_seed,
        "seeds": len(seeds),
        "requested": sum(plan.values()),
        "kept": len(synthesized),
        "kept_per_op": {op: sum(e.metadata["op"] == op for e in synthesized) for op in sc.ops},
        "dropped": {reason: dropped.get(reason, 0) for reason in DROP_REASONS},
        "cache": cache_stats,
    }
    return synthesized, report


def add_synthesized_traces(cfg: StageView, train_examples: list[Example], selected: list, tokenizer
                           ) -> tuple[list, dict]:
    """The build step: `selected` plus one trace per synthesized problem (its verified program), and the report.

    The new traces skip the vote (there is no gold to vote against: the program's result IS the answer) but go
    through the budget and the pairs like every selected trace. Eval questions = every non-train split of `data`.
    """
    if not cfg.traces.synthesize.enabled:
        return selected, {"enabled": False}
    from reasonlite.budget import count_tokens_many
    from reasonlite.data.splits import load_splits
    from reasonlite.formats import render_completion
    from reasonlite.traces.verify import Trace

    eval_questions = [ex.question for name, split in load_splits(cfg.data).items() if name != "train"
                      for ex in split]
    new, report = synthesize(cfg, train_examples, eval_questions)
    traces = [Trace(id=f"{ex.id}#0", example_id=ex.id, question=ex.question, label=ex.answer, domain=ex.domain,
                    style="pal", text=render_completion("pal", answer=ex.answer, program=ex.program),
                    program=ex.program, answer=ex.answer, status="correct")
              for ex in new]
    for t, n in zip(traces, count_tokens_many([t.program for t in traces], tokenizer)):
        t.tokens = n
    return selected + traces, report
