"""Load `Example`s from user files: .jsonl, .json, .csv/.tsv, and local Hugging Face `datasets` files.

A field mapping says which source column feeds which `Example` field ({"question": "prompt", "answer": "label"}).
A `context` column holds what the answer depends on: plain text, or a list of {filename, text} sources.
Bad rows are reported with file and line (or row index for parquet/arrow): ``on_bad="skip"`` drops them and
counts them in a `LoadReport`; ``on_bad="fail"`` raises `DataError` naming the location, the field and the fix.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from rich.console import Console

from reasonlite.answers import extract_answer, normalize_answer, to_number
from reasonlite.data.example import EXAMPLE_FIELDS, Example, Source
from reasonlite.jsonl import JsonlError, iter_jsonl

__all__ = [
    "SUPPORTED_SUFFIXES",
    "BadRow",
    "DataError",
    "LoadReport",
    "load_examples",
    "load_examples_with_report",
]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


class DataError(ValueError):
    """A data file or row cannot be turned into `Example`s; the message names where, which field, and the fix."""

    exit_code = 3  # the CLIs' "data/model not found" (reasonlite.cli_boundary)


class BadRow(BaseModel):
    location: str = Field(description="'file:line' (text files) or 'file:row N' (parquet/arrow/datasets folders)")
    field: str = Field(description="the Example field (or '<json>' / '<row>') that is wrong")
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.location}: field {self.field!r}: {self.reason} (fix: {self.fix})"


class LoadReport(BaseModel):
    path: str
    rows: int = 0
    loaded: int = 0
    bad: list[BadRow] = Field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad)


class _RowProblem(Exception):
    def __init__(self, field: str, reason: str, fix: str):
        super().__init__(reason)
        self.field, self.reason, self.fix = field, reason, fix


# ---------------------------------------------------------------------------------------------------------------
# Raw rows: (location, dict | _RowProblem) per source row
# ---------------------------------------------------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | _RowProblem]]:
    for line_no, row in iter_jsonl(path, errors="yield"):
        loc = f"{path}:{line_no}"
        if isinstance(row, JsonlError):
            yield loc, _RowProblem("<json>", f"invalid JSON ({row.reason})", "write one JSON object per line")
            continue
        yield loc, row if isinstance(row, dict) else _RowProblem(
            "<json>", f"expected a JSON object, got {type(row).__name__}", "write one JSON object per line")


def _json_rows(path: Path) -> Iterator[tuple[str, dict | _RowProblem]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file or save it as .jsonl") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}); use .jsonl for one per line")
    for i, row in enumerate(data):
        loc = f"{path}:item {i}"
        yield loc, row if isinstance(row, dict) else _RowProblem(
            "<json>", f"expected a JSON object, got {type(row).__name__}", "make every list item an object")


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict | _RowProblem]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        while True:
            start_line = reader.line_num + 1  # the physical line where the next record begins
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{path}:{start_line}: malformed CSV ({exc}); check quoting on that line") from exc
            loc = f"{path}:{start_line}"
            if None in row:
                yield loc, _RowProblem("<row>", f"{len(row[None])} more values than header columns",
                                       "quote values that contain the delimiter")
                continue
            yield loc, row


def _hf_rows(path: Path, split: str | None) -> Iterator[tuple[str, dict | _RowProblem]]:
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path))
        else:
            ds = datasets.Dataset.from_file(str(path))
    except Exception as exc:  # datasets raises several types for a folder/file that is not a dataset
        raise DataError(f"{path}: not a readable Hugging Face dataset ({exc}); "
                        "save it with Dataset.save_to_disk or as .parquet") from exc
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if chosen not in ds:
            raise DataError(f"{path}: dataset has splits {names}; pass split=<one of them>")
        ds = ds[chosen]
    for i, row in enumerate(ds):
        yield f"{path}:row {i}", row


def _raw_rows(path: Path, split: str | None) -> Iterator[tuple[str, dict | _RowProblem]]:
    if path.is_dir():
        return _hf_rows(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    if suffix in (".parquet", ".arrow"):
        return _hf_rows(path, split)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)} "
                    "or a datasets.save_to_disk folder")


# ---------------------------------------------------------------------------------------------------------------
# Row -> Example
# ---------------------------------------------------------------------------------------------------------------

def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _row_to_example(row: dict, mapping: dict[str, str], index: int, stem: str, require_numeric_answer: bool,
                    domain: str | None) -> Example:
    templates = {f: t for f, t in mapping.items() if "{" in t}
    if templates:  # a field built from several columns: {"question": "{Body} {Question}"}
        row, mapping = dict(row), dict(mapping)
        for field, template in templates.items():
            try:
                row[f"<{field}>"] = template.format_map(row)
            except KeyError as exc:
                raise _RowProblem(field, f"template {template!r} names column {exc.args[0]!r}, which the row lacks",
                                  f"use one of the columns {list(row)}") from None
            except (ValueError, IndexError) as exc:
                raise _RowProblem(field, f"template {template!r} is not a valid format string ({exc})",
                                  "write columns in braces, e.g. '{Body} {Question}'") from None
            mapping[field] = f"<{field}>"

    def column(field: str) -> str:
        return mapping.get(field, field)

    question = _text(row.get(column("question")))
    if question is None:
        present = "missing" if column("question") not in row else "empty"
        raise _RowProblem("question", f"column {column('question')!r} is {present}",
                          f"add it, or map another column: mapping={{'question': <column>}} (columns: {list(row)})")

    raw_answer = row.get(column("answer"))
    answer: str | None
    if isinstance(raw_answer, str) and "####" in raw_answer:  # GSM8K-style solution text: the answer follows ####
        answer = extract_answer(raw_answer)
    else:
        answer = normalize_answer(raw_answer) if _text(raw_answer) is not None else None
    if require_numeric_answer and (answer is None or to_number(answer) is None):
        found = "missing" if answer is None else f"not a number ({raw_answer!r})"
        raise _RowProblem("answer", f"column {column('answer')!r} is {found}",
                          "give a numeric answer, map the right column, or set require_numeric_answer=False")

    raw_metadata = row.get(column("metadata"))
    if isinstance(raw_metadata, str) and raw_metadata.strip():
        try:
            raw_metadata = json.loads(raw_metadata)
        except json.JSONDecodeError:
            raise _RowProblem("metadata", "is a string but not JSON", "store metadata as a JSON object") from None
    if raw_metadata is not None and raw_metadata != "" and not isinstance(raw_metadata, dict):
        raise _RowProblem("metadata", f"expected an object, got {type(raw_metadata).__name__}",
                          "store metadata as a JSON object or drop the column")
    context = _context(row.get(column("context")), column("context"))
    used = {column(f) for f in EXAMPLE_FIELDS}
    # source columns we do not map are kept, so nothing the user had is silently lost
    metadata = {str(k): v for k, v in row.items() if k not in used}
    metadata.update(raw_metadata or {})

    return Example(
        id=_text(row.get(column("id"))) or f"{stem}-{index}",
        question=question,
        answer=answer,
        rationale=_text(row.get(column("rationale"))),
        program=_text(row.get(column("program"))),
        domain=domain or _text(row.get(column("domain"))) or "general",
        metadata=metadata,
        context=context,
    )


def _context(raw: Any, name: str) -> list[Source] | None:
    """A `context` cell: plain text (one source, shown as `[1] context`), or a list of {filename, text} objects
    (in a CSV cell: that list as JSON)."""
    if isinstance(raw, str) and raw.strip().startswith("[{"):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            pass  # text that merely starts like JSON
    if isinstance(raw, list):
        try:
            sources = [Source.model_validate(s) for s in raw]
        except ValidationError:
            raise _RowProblem("context", f"column {name!r} is a list, but not of {{filename, text}} objects",
                              "give each source a filename and a text, or plain text for one source") from None
        return sources or None
    text = _text(raw)
    return None if text is None else [Source(filename="context", text=text.strip())]


def load_examples_with_report(
    path: str | Path,
    mapping: dict[str, str] | None = None,
    on_bad: Literal["skip", "fail"] = "skip",
    require_numeric_answer: bool = False,
    domain: str | None = None,
    split: str | None = None,
) -> tuple[list[Example], LoadReport]:
    """Like `load_examples`, and also return the `LoadReport` listing every skipped row."""
    path = Path(path)
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(EXAMPLE_FIELDS))
    if unknown:
        raise DataError(f"mapping has unknown field(s) {unknown}; map our fields {list(EXAMPLE_FIELDS)} "
                        "to source columns, e.g. {'question': 'prompt', 'answer': 'label'}")
    if on_bad not in ("skip", "fail"):
        raise DataError(f"on_bad={on_bad!r} is not valid; use 'skip' or 'fail'")
    if not path.exists():
        raise DataError(f"data file not found: {path} (fix: check the path; relative paths are resolved from "
                        f"{Path.cwd()})")

    report = LoadReport(path=str(path))
    examples: list[Example] = []
    seen_ids: set[str] = set()
    for loc, row in _raw_rows(path, split):
        report.rows += 1
        try:
            if isinstance(row, _RowProblem):
                raise row
            example = _row_to_example(row, mapping, report.rows - 1, path.stem, require_numeric_answer, domain)
            if example.id in seen_ids:
                raise _RowProblem("id", f"duplicate id {example.id!r}", "make ids unique or drop the id column")
        except _RowProblem as problem:
            bad = BadRow(location=loc, field=problem.field, reason=problem.reason, fix=problem.fix)
            if on_bad == "fail":
                raise DataError(str(bad)) from None
            report.bad.append(bad)
            continue
        seen_ids.add(example.id)
        examples.append(example)
    report.loaded = len(examples)

    if report.rows == 0:
        raise DataError(f"{path}: no rows found; the file is empty")
    if not examples:
        raise DataError(f"{path}: all {report.rows} rows are bad; first: {report.bad[0]}")
    return examples, report


def load_examples(
    path: str | Path,
    mapping: dict[str, str] | None = None,
    on_bad: Literal["skip", "fail"] = "skip",
    require_numeric_answer: bool = False,
    domain: str | None = None,
    split: str | None = None,
) -> list[Example]:
    """Read a .jsonl/.json/.csv/.tsv/.parquet/.arrow file or a `datasets` folder into `Example`s.

    ``mapping`` maps our field names to source columns. Skipped rows are summarised on stderr; use
    `load_examples_with_report` to get them as data.
    """
    examples, report = load_examples_with_report(path, mapping, on_bad, require_numeric_answer, domain, split)
    if report.bad:
        console = Console(stderr=True)
        console.print(f"[yellow]skipped {report.skipped} of {report.rows} rows in {path}[/yellow]")
        for bad in report.bad[:5]:
            console.print(f"  {bad}", style="yellow", markup=False, highlight=False)
        if report.skipped > 5:
            console.print(f"  ... and {report.skipped - 5} more")
    return examples

