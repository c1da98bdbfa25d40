"""Evaluation: accuracy against cost for a student, one point per inference budget, written as JSON + Markdown + PNG.

`evaluate(student, examples, budgets, n)` solves every question at every budget and measures accuracy, generated
tokens (reasoning + answer; mean and p95), latency, throughput, exec-error and forced rates, broken down by domain,
template and split. `write_report` writes result.json, report.md and accuracy_vs_tokens.png; `eval_command` is the
`reasonlite eval` CLI and `compare_runs` the `reasonlite compare` table.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from reasonlite.data.example import Example

console = Console()
BREAKDOWNS = ("domain", "template", "split")  # record fields the report groups accuracy by


@dataclass
class EvalPoint:
    """Metrics of one (budget, n) setting over the whole eval set, with per-question records."""

    budget: int | None
    n: int
    metrics: dict[str, float]
    breakdown: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # dim -> value -> metrics
    records: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "no budget" if self.budget is None else f"budget {self.budget}"


@dataclass
class EvalResult:
    model: str
    format: str
    data: str
    n: int
    points: list[EvalPoint]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Accuracy of the first point (the run's own budget setting)."""
        return self.points[0].metrics["accuracy"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        points = [EvalPoint(**p) for p in data["points"]]
        return cls(**{**data, "points": points})

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read a result.json (or a report folder holding one)."""
        path = Path(path)
        path = path / "result.json" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"{path}: no eval result here; pass a report folder or its result.json")
        return cls.from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else 0.0


def _summarise(records: list[dict], wall_s: float) -> dict[str, float]:
    total = len(records)
    tokens = [r["reasoning_tokens"] + r["answer_tokens"] for r in records]

    def rate(key: str, value: Any = True) -> float:
        return sum(r[key] == value for r in records) / total

    return {
        "accuracy": rate("correct"),
        "correct": sum(r["correct"] for r in records),
        "total": total,
        "mean_tokens": sum(tokens) / total,
        "p95_tokens": _percentile(tokens, 95),
        "mean_reasoning_tokens": sum(r["reasoning_tokens"] for r in records) / total,
        "mean_answer_tokens": sum(r["answer_tokens"] for r in records) / total,
        "latency_s": sum(r["latency_s"] for r in records) / total,  # wall time of the batch each question was in
        "seconds_per_question": wall_s / total,
        "tokens_per_s": sum(tokens) / wall_s if wall_s > 0 else 0.0,
        "exec_error_rate": rate("status", "exec_error"),
        "forced_rate": rate("forced"),
        "no_answer_rate": rate("status", "no_answer"),
        "mean_samples": sum(r["samples"] for r in records) / total,
        "mean_agreement": sum(r["agreement"] for r in records) / total,
    }


def _breakdown(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for dim in BREAKDOWNS:
        groups: dict[str, list[dict]] = {}
        for r in records:
            if r.get(dim) is not None:
                groups.setdefault(str(r[dim]), []).append(r)
        if len(groups) >= 1 and not (dim == "split" and len(groups) == 1):
            out[dim] = {value: {"accuracy": sum(r["correct"] for r in rs) / len(rs), "total": len(rs),
                                "mean_tokens": sum(r["reasoning_tokens"] + r["answer_tokens"] for r in rs) / len(rs)}
                        for value, rs in sorted(groups.items())}
    return out


def evaluate(student, examples: Sequence[Example], budgets: Sequence[int | None] | None = None, n: int = 1,
             temperature: float = 0.7, early_exit: bool = True, max_new_tokens: int = 256,
             batch_size: int | None = None, seed: int | None = 0, data_name: str = "",
             progress: bool = True, select: str = "vote", verifier: Any = None,
             sources: Sequence[Any] | None = None, context_mode: str = "none") -> EvalResult:
    """Solve every example at every budget (None = no cap) and measure accuracy against generated tokens.
    `sources` (one list or None per example, `reasonlite.context.sources_for`) go before each question; the
    `context_mode` they came from is recorded in the result's meta.

    `select` picks the answer among the n samples: vote (majority; n=1 is greedy), greedy (n must be 1) or verifier
    (`verifier`, a `reasonlite.verifier.Verifier`, scores all n samples; the metrics then also hold first-sample,
    vote, verifier and oracle pass@n accuracy, all judged on the same n samples per question)."""
    from reasonlite.answers import answers_match

    if not examples:
        raise ValueError("the eval set is empty: check --data / --limit, or the config's eval.splits and data section")
    if select not in ("greedy", "vote", "verifier"):
        raise ValueError(f"select '{select}' is not one of greedy, vote, verifier (eval.select / --select)")
    if select == "greedy" and n > 1:
        raise ValueError(f"select 'greedy' answers with one greedy sample but n is {n}: pass n=1, or select vote")
    if select == "verifier" and (verifier is None or n < 2):
        raise ValueError("select 'verifier' picks among n >= 2 samples with a trained verifier: pass n >= 2 "
                         "(eval.n / --n) and the verifier folder (eval.verifier_path / --verifier)")
    if sources is not None and len(sources) != len(examples):
        raise ValueError(f"sources has {len(sources)} entries for {len(examples)} examples: pass one per example")
    if sources is not None and any(sources) and select == "verifier":
        raise ValueError("eval.select 'verifier' does not score questions with sources yet: use eval.select vote, "
                         "or eval.context_modes [none]")
    settings = list(dict.fromkeys(budgets)) if budgets else [None]
    size = batch_size or getattr(student, "batch_size", 16)
    points: list[EvalPoint] = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        for budget in settings:
            task = bar.add_task(f"eval {'no budget' if budget is None else f'budget {budget}'} (n={n})",
                                total=len(examples))
            records: list[dict] = []
            t0 = time.perf_counter()
            for start in range(0, len(examples), size):
                chunk = list(examples[start: start + size])
                outcomes: list[dict] = [{} for _ in chunk]
                if select == "verifier":
                    from reasonlite.verifier import solve_with_verifier

                    solutions, outcomes = solve_with_verifier(
                        student, verifier, [e.question for e in chunk], [e.answer for e in chunk], n=n,
                        temperature=temperature, budget=budget, max_new_tokens=max_new_tokens,
                        seed=None if seed is None else seed + start)
                else:  # one seed per chunk keeps sampled runs reproducible whatever the batch boundaries elsewhere
                    solutions = student.solve_batch([e.question for e in chunk], budget=budget, n=n,
                                                temperature=temperature, max_new_tokens=max_new_tokens,
                                                early_exit=early_exit, seed=None if seed is None else seed + start,
                                                batch_size=size, **({} if sources is None else {
                                                    "sources": sources[start: start + size]}))
                for example, sol, outcome in zip(chunk, solutions, outcomes):
                    records.append({
                        "id": example.id, "domain": example.domain, "template": example.metadata.get("template"),
                        "split": example.metadata.get("split"), "gold": example.answer, "pred": sol.answer,
                        "correct": bool(sol.answer is not None and answers_match(sol.answer, example.answer)),
                        "status": sol.status, "forced": sol.forced, "samples": sol.samples,
                        "agreement": sol.agreement, "reasoning_tokens": sol.reasoning_tokens,
                        "answer_tokens": sol.answer_tokens, "latency_s": sol.latency_s, "error": sol.error,
                        "text": sol.text, **outcome,
                    })
                bar.advance(task, len(chunk))
            wall = time.perf_counter() - t0
            metrics = _summarise(records, wall)
            if select == "verifier":
                from reasonlite.verifier import selection_metrics

                metrics.update(selection_metrics(records))
            points.append(EvalPoint(budget, n, metrics, _breakdown(records), records))
    return EvalResult(model=str(getattr(student, "name", "student")), format=str(getattr(student, "fmt", "?")),
                      data=data_name, n=n, points=points,
                      meta={"temperature": temperature if n > 1 else 0.0, "early_exit": early_exit, "select": select,
                            "context": context_mode,
                            "verifier": str(verifier.path) if getattr(verifier, "path", None) else None,
                            "max_new_tokens": max_new_tokens, "seed": seed, "questions": len(examples),
                            "calculator": bool(getattr(student, "calculator", False)),
                            "budget_conditioned": bool(getattr(student, "budget_conditioned", False))})


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [  # (metric, header, format)
    ("accuracy", "accuracy", "{:.1%}"), ("mean_tokens", "mean tok", "{:.1f}"), ("p95_tokens", "p95 tok", "{:.0f}"),
    ("mean_reasoning_tokens", "reasoning tok", "{:.1f}"), ("mean_answer_tokens", "answer tok", "{:.1f}"),
    ("latency_s", "latency s", "{:.2f}"), ("seconds_per_question", "s/question", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"), ("exec_error_rate", "exec err", "{:.1%}"),
    ("forced_rate", "forced", "{:.1%}"), ("no_answer_rate", "no answer", "{:.1%}"),
]


SELECTION_COLUMNS = ("first_accuracy", "vote_accuracy", "verifier_accuracy", "oracle_accuracy")  # select: verifier
CONSOLE_COLUMNS = ("accuracy", "mean_tokens", "p95_tokens", "seconds_per_question", "tokens_per_s", "exec_error_rate",
                   "forced_rate")  # the terminal is narrow: the full set lives in report.md


def _console_columns() -> list[tuple[str, str, str]]:
    return [c for c in SUMMARY_COLUMNS if c[0] in CONSOLE_COLUMNS]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(result: EvalResult) -> str:
    parts = [f"# Eval: {result.model}", "",
             (f"- format: `{result.format}`, data: `{result.data or '?'}`, questions: {result.meta.get('questions')}, "
             f"n: {result.n}, max_new_tokens: {result.meta.get('max_new_tokens')}, "
             f"calculator: {result.meta.get('calculator', False)}, select: {result.meta.get('select', 'vote')}, "
             f"context: {result.meta.get('context', 'none')}"), "",
             "## Summary", ""]
    rows = [[p.label] + [fmt.format(p.metrics[key]) for key, _, fmt in SUMMARY_COLUMNS] for p in result.points]
    parts += [_md_table(["setting"] + [h for _, h, _ in SUMMARY_COLUMNS], rows), ""]
    selection = [k for k in SELECTION_COLUMNS if k in result.points[0].metrics]
    if selection:
        parts += [f"## Selection at equal samples (n={result.n} per question)", "",
                  _md_table(["setting"] + [k.removesuffix("_accuracy") for k in selection],
                            [[p.label] + [f"{p.metrics.get(k, 0.0):.1%}" for k in selection] for p in result.points]),
                  "", "first = the first sample alone, oracle = pass@n (any sample correct).", ""]
    for dim in BREAKDOWNS:
        values = sorted({v for p in result.points for v in p.breakdown.get(dim, {})})
        if not values:
            continue
        parts += [f"## Accuracy by {dim}", ""]
        header = [dim, "questions"] + [p.label for p in result.points]
        table = [[v, str(result.points[0].breakdown[dim].get(v, {}).get("total", 0))]
                 + [f"{p.breakdown.get(dim, {}).get(v, {}).get('accuracy', 0.0):.1%}" for p in result.points]
                 for v in values]
        parts += [_md_table(header, table), ""]
    wrong = [r for r in result.points[0].records if not r["correct"]][:5]
    if wrong:
        parts += [f"## First misses ({result.points[0].label})", ""]
        parts += [_md_table(["id", "gold", "pred", "status", "tokens"],
                            [[r["id"], str(r["gold"]), str(r["pred"]), r["status"],
                              str(r["reasoning_tokens"] + r["answer_tokens"])] for r in wrong]), ""]
    return "\n".join(parts)


def plot_accuracy_vs_tokens(results: Sequence[EvalResult], path: str | Path) -> Path:
    """One line per result, one point per budget: mean generated tokens (x) against accuracy (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        xs = [p.metrics["mean_tokens"] for p in result.points]
        ys = [p.metrics["accuracy"] * 100 for p in result.points]
        ax.plot(xs, ys, marker="o", label=f"{Path(result.model).name} (n={result.n})")
        for p, x, y in zip(result.points, xs, ys):
            ax.annotate("none" if p.budget is None else str(p.budget), (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean generated tokens per question")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs tokens (labels: reasoning budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """result.json, report.md and accuracy_vs_tokens.png in `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "result.json", "md": out / "report.md", "png": out / "accuracy_vs_tokens.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2, default=str))
    paths["md"].write_text(render_markdown(result))
    plot_accuracy_vs_tokens([result], paths["png"])
    return paths


def summary_table(result: EvalResult, title: str | None = None) -> Table:
    table = Table(title=title or f"{result.model} [{result.format}] on {result.data}")
    table.add_column("setting")
    for _, header, _ in _console_columns():
        table.add_column(header, justify="right")
    for p in result.points:
        table.add_row(p.label, *[fmt.format(p.metrics[key]) for key, _, fmt in _console_columns()])
    return table


def compare_runs(paths: Sequence[str | Path], show: bool = True) -> list[dict]:
    """Side-by-side table of eval results (report folders or result.json files); returns the rows."""
    if not paths:
        raise ValueError("compare needs at least one eval result folder or result.json")
    results = [(Path(p), EvalResult.load(p)) for p in paths]
    table = Table(title="ReasonLite eval comparison")
    for header in ("run", "format", "setting", "n", "Δacc"):
        table.add_column(header)
    for _, header, _ in _console_columns():
        table.add_column(header, justify="right")
    rows = []
    base = results[0][1].accuracy
    for path, result in results:
        name = path.parent.name if path.name == "result.json" else path.name
        for p in result.points:
            table.add_row(name, result.format, p.label, str(p.n), f"{p.metrics['accuracy'] - base:+.1%}",
                          *[fmt.format(p.metrics[key]) for key, _, fmt in _console_columns()])
            rows.append({"run": name, "model": result.model, "format": result.format, "budget": p.budget, "n": p.n,
                         **p.metrics, "accuracy_delta_vs_first": p.metrics["accuracy"] - base})
    if show:
        console.print(table)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# `reasonlite eval`
# --------------------------------------------------------------------------------------------------------------------


def _tag_split(examples: Sequence[Example], split: str) -> list[Example]:
    return [e.model_copy(update={"metadata": {**e.metadata, "split": split}}) for e in examples]


RETAIL_EVAL_SPLITS = ("test", "test_heldout_families", "test_reworded")
RETAIL_DOCS_EVAL_SPLITS = ("test", "test_heldout_kinds")


def load_eval_data(data: str, limit: int | None = None, seed: int = 0,
                   field_mapping: dict[str, str] | None = None) -> list[Example]:
    """Eval examples for `--data`: retail_math (its held-out splits), retail_docs (test and test_heldout_kinds, with
    their gold context), gsm8k (the test file), or a JSONL/CSV path read with `field_mapping` (the config's
    `data.field_mapping`).

    `limit` applies per split.
    """
    from reasonlite.config import DataConfig
    from reasonlite.data.splits import load_splits

    if data == "retail_math":
        n = limit or DataConfig().n_test
        splits = load_splits(DataConfig(source="retail_math", n_train=1, n_test=n, n_test_heldout_families=n,
                                        n_test_reworded=n, seed=seed))
        return [e for name in RETAIL_EVAL_SPLITS for e in _tag_split(splits[name][:limit], name)]
    if data == "retail_docs":
        from reasonlite.data.retail_docs import retail_docs_splits

        n = limit or DataConfig().n_test
        splits = retail_docs_splits(1, n, seed=seed, n_test_heldout=n)
        return [e for name in RETAIL_DOCS_EVAL_SPLITS for e in _tag_split(splits[name][:limit], name)]
    if data == "gsm8k" or data.startswith("gsm8k:"):
        from reasonlite.data.gsm8k import load_gsm8k
        from reasonlite.data.splits import default_gsm8k_dir

        path = Path(data.split(":", 1)[1]) if ":" in data else default_gsm8k_dir() / "test.jsonl"
        return load_gsm8k(path, split="test")[:limit]
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: not retail_math, retail_docs, gsm8k, or an existing .jsonl/.csv file")
    if "gsm8k" in path.name.lower() or "gsm8k" in path.parent.name.lower():
        from reasonlite.data.gsm8k import load_gsm8k

        return load_gsm8k(path, split="test")[:limit]
    from reasonlite.data.loaders import load_examples

    return load_examples(path, mapping=field_mapping)[:limit]


def load_dev_data(data: str, limit: int, seed: int = 0, field_mapping: dict[str, str] | None = None) -> list[Example]:
    """Tuning questions for a task set, never its test questions: retail_math -> fresh questions of the trained
    families (`retail_math_dev`); gsm8k -> the last `limit` GSM8K *train* questions (GSM8K has no dev split; a
    student trained on all of train has seen them); a file -> its own rows (pass a separate dev file)."""
    if data == "retail_math":
        from reasonlite.data.retail_math import retail_math_dev

        return _tag_split(retail_math_dev(limit, seed=seed), "dev")
    if data == "gsm8k":
        from reasonlite.data.gsm8k import load_gsm8k
        from reasonlite.data.splits import default_gsm8k_dir

        return _tag_split(load_gsm8k(default_gsm8k_dir() / "train.jsonl", split="train")[-limit:], "dev")
    return _tag_split(load_eval_data(data, limit=limit, seed=seed, field_mapping=field_mapping), "dev")


def _parse_budgets(text: str | Sequence[int | None] | None) -> list[int | None] | None:
    if text is None or isinstance(text, (list, tuple)):
        return list(text) if text else None
    out: list[int | None] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if part in ("none", "inf", "0", ""):
            out.append(None)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"--budgets '{text}': expected comma-separated token counts, e.g. 32,64,none")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-") or "model"


def eval_command(target: str, data: str | None = None, fmt: str | None = None, budgets: str | None = None, n: int = 1,
                 limit: int | None = None, out: str | Path | None = None,
                 overrides: Sequence[str] | None = None) -> EvalResult:
    """`reasonlite eval TARGET`: TARGET is a run config YAML (its exported model) or a model alias/folder."""
    from reasonlite.config import load_config, parse_override
    from reasonlite.infer import Student, read_student_meta

    parsed = dict(parse_override(o) for o in overrides or [])
    is_config = Path(target).suffix in (".yaml", ".yml") and Path(target).is_file()
    cfg = load_config(target if is_config else None, parsed).stage_view("eval")  # what `reasonlite run` evaluates with
    if is_config:
        run_dir = Path(cfg.runs_dir) / cfg.name
        model_ref: str = str(run_dir / "train" / "model")
        if not (Path(model_ref) / "config.json").exists() and not (Path(model_ref) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{model_ref}: no exported model for run '{cfg.name}'; run "
                                    f"`reasonlite train {target}` (or `reasonlite run {target}`) first")
        fmt = fmt or read_student_meta(model_ref).get("format") or cfg.student.format
        # runs/<name>/eval links to the cached eval stage of `reasonlite run`: an ad-hoc eval (other budgets, limit,
        # data) must not write through that link into the stage folder, so it gets its own folder beside it.
        out = out or run_dir / ("eval-cli" if (run_dir / "eval").is_symlink() else "eval")
    else:
        model_ref = target
        out = out or Path(cfg.runs_dir) / f"eval-{_slug(target)}"
    budget_list = _parse_budgets(budgets)
    if budget_list is None:
        budget_list = list(dict.fromkeys([cfg.budget.reasoning_budget, *cfg.eval.budgets]))
    n = n if n != 1 else cfg.eval.n
    limit = limit or cfg.eval.limit
    if data:
        examples, data_name = load_eval_data(data, limit, seed=cfg.data.seed,
                                             field_mapping=cfg.data.field_mapping), data
    elif is_config:
        from reasonlite.data.splits import load_splits

        splits = load_splits(cfg.data)
        missing = [s for s in cfg.eval.splits if s not in splits]
        if missing:
            raise ValueError(f"eval.splits: {missing} not produced by data.source '{cfg.data.source}' "
                             f"(available: {sorted(splits)})")
        examples = [e for s in cfg.eval.splits for e in _tag_split(splits[s][:limit], s)]
        data_name = f"{cfg.data.source}:{'+'.join(cfg.eval.splits)}"
    else:
        examples, data_name = load_eval_data("retail_math", limit, seed=cfg.data.seed), "retail_math"
    student = Student(model_ref, fmt=fmt or None, forcing=cfg.budget.forcing, answer_tokens=cfg.budget.answer_tokens,
                      batch_size=cfg.eval.batch_size, calculator=cfg.eval.calculator)
    verifier = None
    if cfg.eval.select == "verifier":
        from reasonlite.verifier import Verifier

        verifier = Verifier.load(cfg.eval.verifier_path, batch_size=cfg.eval.batch_size)
    from reasonlite.context import sources_for

    modes = list(cfg.eval.context_modes)
    results = []
    for mode in modes:  # one report per eval.context_modes entry; [none] (the default) writes `out` itself
        sources = sources_for(examples, mode, cfg.context, cfg.runs_dir, knob="eval.context_modes")
        result = evaluate(student, examples, budgets=budget_list, n=n, temperature=cfg.eval.temperature,
                          early_exit=cfg.eval.early_exit, max_new_tokens=cfg.eval.max_new_tokens, data_name=data_name,
                          select=cfg.eval.select, verifier=verifier, sources=None if mode == "none" else sources,
                          context_mode=mode)
        paths = write_report(result, out if modes == ["none"] else Path(out) / f"context-{mode}")
        console.print(summary_table(result, title=None if modes == ["none"] else
                                    f"{result.model} [{result.format}] on {result.data}, context {mode}"))
        if verifier is not None:
            console.print("at equal samples: " + ", ".join(
                f"{k.removesuffix('_accuracy')} {result.points[0].metrics[k]:.1%}" for k in SELECTION_COLUMNS))
        console.print(f"report: {paths['md']}  plot: {paths['png']}  json: {paths['json']}")
        results.append(result)
    return results[0]
