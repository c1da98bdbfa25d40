"""`build_trace_set(cfg, out_dir)`: ask the teacher, verify, vote, apply the budget, pair, write the folder.

    train split -> teacher prompts (style + few-shot) -> k completions each (SQLite cache first)
      -> parse + execute (verify) -> vote / grade / min_agreement (self_consistency) -> selection
      -> budget policy (student tokens) -> contrastive pairs -> folder

The folder (written to a temp dir, then renamed into place, so readers never see half a trace set):
  traces.jsonl       the SELECTED traces the student trains on
  all_traces.jsonl   every sample with its status
  pairs.jsonl        contrastive (chosen, rejected) pairs
  manifest.json      config hash, counts by status, teacher accuracy, agreement histogram, token stats before/after
                     the budget, cache stats (hits, misses, calls, estimated tokens saved)
A run killed mid-way keeps every completion that had arrived (the cache); running it again asks only for the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from reasonlite.budget import apply_budget, count_tokens_many, token_stats
from reasonlite.config import ReasonLiteConfig, StageView
from reasonlite.teachers import CompletionCache, TeacherPrompt, complete_cached, make_teacher
from reasonlite.traces.pairs import Pair, make_pairs
from reasonlite.traces.prompts import pick_exemplars, teacher_messages
from reasonlite.traces.self_consistency import select, vote_and_grade
from reasonlite.traces.synthesize import add_synthesized_traces
from reasonlite.traces.verify import Trace, execute_programs, parse_trace

STATUSES = ("correct", "wrong", "exec_error", "no_answer", "unverified")


@dataclass
class TraceSet:
    """A trace-set folder in memory: selected traces, pairs, manifest (all_traces read on demand)."""

    path: Path
    traces: list[Trace]
    pairs: list[Pair]
    manifest: dict
    _all: list[Trace] | None = field(default=None, repr=False)

    @property
    def all_traces(self) -> list[Trace]:
        if self._all is None:
            self._all = _read_jsonl(self.path / "all_traces.jsonl", Trace)
        return self._all

    @classmethod
    def load(cls, path: str | Path) -> TraceSet:
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise FileNotFoundError(f"{path} is not a trace set (no manifest.json): build one with "
                                    "`reasonlite traces CONFIG --out DIR`")
        return cls(path=path, traces=_read_jsonl(path / "traces.jsonl", Trace),
                   pairs=_read_jsonl(path / "pairs.jsonl", Pair),
                   manifest=json.loads((path / "manifest.json").read_text()))


def _read_jsonl(path: Path, model):
    if not path.exists():
        return []
    # split on "\n" only: str.splitlines() also breaks at U+2028 / U+0085, which JSON strings carry unescaped
    # (GSM8K questions have them)
    return [model.model_validate_json(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def load_train_examples(cfg: StageView) -> list:
    """The training split of the configured data source."""
    from reasonlite.data.splits import load_splits

    return load_splits(cfg.data)["train"]


def default_cache_path(cfg: StageView) -> Path:
    """teacher.cache_path, else <runs_dir>/teacher_cache.sqlite (beside the run folders, shared by every run)."""
    return Path(cfg.teacher.cache_path) if cfg.teacher.cache_path else Path(cfg.runs_dir) / "teacher_cache.sqlite"


async def _ask_teacher(teacher, cache, prompts, k, count_tokens, show_progress: bool, console: Console):
    done_per_prompt = [0] * len(prompts)
    counters = {"hits": 0}
    columns = [TextColumn("[bold]teacher[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("questions · calls {task.fields[calls]} · cache hits {task.fields[hits]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(f"{teacher.kind}:{teacher.model_id}", total=len(prompts), calls=0, hits=0)

        def on_sample(i: int, s: int, completion) -> None:
            counters["hits"] += completion.cached
            done_per_prompt[i] += 1
            progress.update(task, advance=1 if done_per_prompt[i] == k else 0, calls=teacher.calls,
                            hits=counters["hits"])

        try:
            result = await complete_cached(teacher, cache, prompts, k, on_sample=on_sample,
                                           count_tokens=count_tokens)
        finally:
            client = getattr(teacher, "client", None)
            if client is not None:  # close the HTTP pool on the loop that opened it
                await client.close()
        progress.update(task, calls=teacher.calls)
    return result


def _run_async(coro):
    """Run the teacher coroutine on uvloop when installed (~20% less client CPU per request), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def build_trace_set(cfg: ReasonLiteConfig | StageView, out_dir: str | Path, show_progress: bool = True,
                    console: Console | None = None) -> TraceSet:
    """Generate, verify, filter and write a trace set for `cfg` into `out_dir`; return it. Reads only the traces
    stage's view of `cfg` (`config.STAGE_SECTIONS`), so every knob it uses is in the trace set's hash."""
    cfg = cfg.stage_view("traces")
    started = time.time()
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    tc, sc = cfg.traces, cfg.traces.self_consistency
    style, k = tc.style, sc.k

    examples = load_train_examples(cfg)
    exemplars = pick_exemplars(tc.few_shot, style, tc.few_shot_path)
    from reasonlite.context import sources_for, with_distractors

    contexts = sources_for(examples, tc.context, cfg.context, cfg.runs_dir, knob="traces.context", seed=cfg.data.seed)
    if tc.context_distractors:
        contexts = with_distractors(contexts, tc.context_distractors, cfg.data.seed)
    prompts = [TeacherPrompt(teacher_messages(ex.question, style, exemplars, sources), ex)
               for ex, sources in zip(examples, contexts)]

    from reasonlite.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.student.model)
    teacher = make_teacher(cfg.teacher, style=style, seed=cfg.data.seed)
    cache = None if teacher.kind == "dataset" else CompletionCache(default_cache_path(cfg))
    try:
        completions, cache_stats = _run_async(_ask_teacher(
            teacher, cache, prompts, k, lambda text: count_tokens_many([text], tokenizer)[0], show_progress, console))
    finally:
        if cache is not None:
            cache.close()

    # verify: parse every reply, execute every program in one sandbox batch, count student tokens
    traces = [parse_trace(ex, style, c.text, s, c.error, context=sources)
              for ex, sources, row in zip(examples, contexts, completions) for s, c in enumerate(row)]
    execute_programs(traces)
    for t, n in zip(traces, count_tokens_many([t.reasoning for t in traces], tokenizer)):
        t.tokens = n

    # self-consistency: vote, grade against gold / pseudo-label, filter by agreement, select
    by_question: dict[str, list[Trace]] = {}
    for t in traces:
        by_question.setdefault(t.example_id, []).append(t)
    votes, selected = [], []
    for ex in examples:
        group = by_question[ex.id]
        vote = vote_and_grade(group, group[0].gold, sc.min_agreement, sc.pseudo_label)
        votes.append(vote)
        if vote.passed:
            selected += select(group, sc.selection, verify=tc.verify)

    # synthesis (traces.synthesize): teacher-written new problems join the selection as their verified programs
    selected, synthesis = add_synthesized_traces(cfg, examples, selected, tokenizer)
    # augmentation (traces.augment): verified variants of each correct program, numbers redrawn, no teacher
    augmentation = _augment(cfg, selected, tokenizer)

    final = apply_budget(selected, cfg.budget.max_trace_tokens, cfg.budget.data_policy, tokenizer)
    pairs = make_pairs(traces, final, counterfactual=tc.counterfactual_negatives, seed=cfg.data.seed)

    manifest = _manifest(cfg, teacher, examples, traces, votes, selected, final, pairs, cache_stats,
                         time.time() - started)
    manifest["synthesis"] = synthesis
    if augmentation is not None:
        manifest["augmentation"] = augmentation
    _write_folder(out_dir, traces, final, pairs, manifest)
    _print_summary(console, out_dir, manifest)
    return TraceSet(path=out_dir, traces=final, pairs=pairs, manifest=manifest, _all=traces)


def _augment(cfg: StageView, selected: list[Trace], tokenizer) -> dict | None:
    """Append `traces.augment.k` verified variants per correct PAL trace to `selected`; the report, or None if off."""
    aug = cfg.traces.augment
    if not aug.k:
        return None
    if cfg.traces.style != "pal":
        raise ValueError("traces.augment.k needs programs to re-execute: set traces.style: pal (or traces.augment.k: 0)")
    from reasonlite.data.splits import load_splits
    from reasonlite.traces.augment import augment_traces

    eval_questions = [e.question for name, split in load_splits(cfg.data).items() if name != "train" for e in split]
    made, report = augment_traces(selected, aug.k, seed=cfg.data.seed, eval_questions=eval_questions,
                                  distractors=aug.distractors, contamination_ngram=aug.contamination_ngram)
    for t, n in zip(made, count_tokens_many([t.reasoning for t in made], tokenizer)):
        t.tokens = n
    selected += made
    return report


def _manifest(cfg, teacher, examples, traces, votes, selected, final, pairs, cache_stats, seconds) -> dict:
    counts = Counter(t.status for t in traces)
    gold_traces = [t for t in traces if t.gold is not None]
    hist = Counter(f"{v.agreement:.2f}" for v in votes)
    return {
        "config_hash": cfg.hash(),  # the traces stage hash: its folder is runs/_stages/traces-<hash>
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "teacher": {"kind": teacher.kind, "model": teacher.model_id, "params": teacher.params},
        "style": cfg.traces.style,
        "k": cfg.traces.self_consistency.k,
        "questions": len(examples),
        "samples": len(traces),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "teacher_accuracy": round(sum(t.status == "correct" for t in gold_traces) / len(gold_traces), 4)
        if gold_traces else None,
        "pseudo_labelled_questions": sum(v.pseudo_label for v in votes),
        "questions_below_min_agreement": sum(not v.passed for v in votes),
        "agreement_histogram": dict(sorted(hist.items())),
        "selection": cfg.traces.self_consistency.selection,
        "selected_before_budget": len(selected),
        "selected": len(final),
        "questions_with_traces": len({t.example_id for t in final}),
        "budget": {"max_trace_tokens": cfg.budget.max_trace_tokens, "policy": cfg.budget.data_policy,
                   "truncated": sum(t.truncated for t in final),
                   "removed": len(selected) - len(final)},
        "tokens": {"counted_with": f"student tokenizer ({cfg.student.model})",
                   "before_budget": token_stats([t.tokens for t in selected]),
                   "after_budget": token_stats([t.tokens for t in final]),
                   "all_samples": token_stats([t.tokens for t in traces if t.reasoning])},
        "pairs": {"total": len(pairs), "counterfactual": sum(p.counterfactual for p in pairs)},
        "cache": {"enabled": teacher.kind != "dataset", **cache_stats.as_dict()},
        "seconds": round(seconds, 2),
    }


def _write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(row.model_dump_json() + "\n")


def _write_folder(out_dir: Path, traces, final, pairs, manifest) -> None:
    """Write into a sibling temp folder, then swap it in with renames: the folder is complete or absent."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_jsonl(tmp / "traces.jsonl", final)
    _write_jsonl(tmp / "all_traces.jsonl", traces)
    _write_jsonl(tmp / "pairs.jsonl", pairs)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _print_summary(console: Console, out_dir: Path, m: dict) -> None:
    table = Table(title=f"trace set -> {out_dir}", show_header=False)
    table.add_row("teacher", f"{m['teacher']['kind']}:{m['teacher']['model']} · style {m['style']} · k={m['k']}")
    table.add_row("samples", f"{m['samples']} for {m['questions']} questions")
    table.add_row("status", ", ".join(f"{s} {n}" for s, n in m["counts"].items() if n))
    acc = m["teacher_accuracy"]
    table.add_row("teacher accuracy", "n/a (no gold)" if acc is None else f"{acc:.1%}")
    table.add_row("selected", f"{m['selected']} traces ({m['questions_with_traces']} questions); "
                              f"{m['questions_below_min_agreement']} questions below min_agreement")
    tb, ta = m["tokens"]["before_budget"], m["tokens"]["after_budget"]
    table.add_row("tokens (student)", f"mean {tb['mean']} -> {ta['mean']}, p95 {tb['p95']} -> {ta['p95']}, "
                                      f"max {tb['max']} -> {ta['max']}")
    table.add_row("pairs", f"{m['pairs']['total']} ({m['pairs']['counterfactual']} counterfactual)")
    c = m["cache"]
    table.add_row("cache", f"hits {c['hits']}, misses {c['misses']}, calls {c['calls']}, "
                           f"~{c['est_tokens_saved']} tokens saved ({c['tokens_counted_with']})")
    console.print(table)
