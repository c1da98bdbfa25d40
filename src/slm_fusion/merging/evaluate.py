"""`slm-fusion merge-eval`: does the merge keep each specialist's skill?

Every input model that declares its task set (`models[i].eval` in the merge YAML) is scored on it with
`reasonlite.evaluate`, and so is the merged model (and, optionally, the base), prompted in that task's format. One
table: per task, the specialist's accuracy, the merged model's accuracy and the difference, plus mean generated tokens.
Writes merge_eval.json and merge_eval.md; each evaluation's own reasonlite report lands in a subfolder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slm_fusion.merging.config import MergeConfig

console = Console()


@dataclass
class TaskRow:
    task: str  # "<data> (<format>)"
    specialist: str
    specialist_accuracy: float
    merged_accuracy: float
    specialist_tokens: float
    merged_tokens: float
    base_accuracy: float | None = None
    questions: int = 0

    @property
    def delta(self) -> float:
        return self.merged_accuracy - self.specialist_accuracy


def format_of(model: str, declared: str | None) -> str:
    if declared:
        return declared
    from reasonlite.infer import read_student_meta
    from reasonlite.models import resolve_model_dir

    try:
        return read_student_meta(resolve_model_dir(model)).get("format") or "cot"
    except (FileNotFoundError, ValueError):
        return "cot"


def merge_eval(cfg: MergeConfig, merged_dir: str | Path, out_dir: str | Path | None = None,
               limit: int | None = None, with_base: bool = False, batch_size: int = 16,
               compare_routing: bool = False) -> list[TaskRow]:
    """Evaluate the merged model and each specialist on each specialist's task set; writes the table files.
    `compare_routing`: also the merged model against the specialists behind a router (`merging.compare`)."""
    from reasonlite.evaluate import evaluate, load_eval_data, write_report
    from reasonlite.infer import Student

    merged_dir = Path(merged_dir)
    if not (merged_dir / "config.json").exists():
        raise FileNotFoundError(f"{merged_dir}: no merged model here (config.json missing); run `slm-fusion merge` "
                                "first or pass the folder it wrote")
    tasks = [(i, m) for i, m in enumerate(cfg.models) if m.eval is not None]
    if not tasks:
        raise ValueError("merge-eval needs a task set: add `eval: {data: retail_math|gsm8k|FILE.jsonl}` to at least "
                         "one entry of `models` in the merge config")
    out = Path(out_dir) if out_dir else merged_dir / "merge_eval"
    out.mkdir(parents=True, exist_ok=True)

    def score(ref: str, name: str, fmt: str, examples, task, folder: str):
        student = Student(ref, fmt=fmt, batch_size=batch_size, name=name)
        result = evaluate(student, examples, budgets=[task.budget], n=1, seed=cfg.seed,
                          data_name=task.data, batch_size=batch_size)
        write_report(result, out / folder)
        return result

    rows: list[TaskRow] = []
    compared = []
    for i, m in tasks:
        task = m.eval
        fmt = format_of(m.model, task.format)
        examples = load_eval_data(task.data, limit=limit or task.limit, seed=cfg.seed)
        if not examples:
            raise ValueError(f"models.{i}.eval.data: {task.data} has no examples")
        console.rule(f"task {i}: {task.data} ({fmt}), {len(examples)} questions")
        spec_result = score(m.model, f"specialist-{i}", fmt, examples, task, f"task{i}-specialist")
        merged_result = score(str(merged_dir), "merged", fmt, examples, task, f"task{i}-merged")
        spec, merged = spec_result.points[0].metrics, merged_result.points[0].metrics
        base = score(cfg.base_model, "base", fmt, examples, task, f"task{i}-base").accuracy \
            if with_base and cfg.base_model else None
        rows.append(TaskRow(f"{task.data} ({fmt})", m.model, spec["accuracy"], merged["accuracy"],
                            spec["mean_tokens"], merged["mean_tokens"], base, len(examples)))
        compared.append((f"{task.data} ({fmt})", fmt, examples, spec_result, merged_result))
    _write(rows, cfg, merged_dir, out)
    if compare_routing:
        from slm_fusion.merging.compare import compare_routing as compare

        if len(tasks) != len(cfg.models):
            raise ValueError("merge-eval --compare-routing routes among the specialists: give every entry of `models` "
                             "an `eval:` task set")
        compare(cfg, merged_dir, compared, out, batch_size=batch_size)
    return rows


def _write(rows: list[TaskRow], cfg: MergeConfig, merged_dir: Path, out: Path) -> None:
    with_base = any(r.base_accuracy is not None for r in rows)
    header = ["task", "questions", "specialist", "merged", "Δ", "tokens spec/merged"] + (["base"] if with_base else [])
    table = Table(title=f"merge-eval: {cfg.merge_method} -> {merged_dir}")
    for h in header:
        table.add_column(h)
    lines = [f"# merge-eval: `{cfg.merge_method}` -> `{merged_dir}`", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.task, str(r.questions), f"{r.specialist_accuracy:.1%}", f"{r.merged_accuracy:.1%}",
                 f"{r.delta * 100:+.1f} pts", f"{r.specialist_tokens:.0f} / {r.merged_tokens:.0f}"]
        if with_base:
            cells.append(f"{r.base_accuracy:.1%}" if r.base_accuracy is not None else "-")
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    (out / "merge_eval.md").write_text("\n".join(lines) + "\n")
    (out / "merge_eval.json").write_text(json.dumps(
        {"merge_method": cfg.merge_method, "merged": str(merged_dir),
         "rows": [{**asdict(r), "delta": r.delta} for r in rows]}, indent=2))
    console.print(f"report: {out / 'merge_eval.md'}")
