"""JSON Lines, read one way everywhere (datasets, few-shot files, routing files, caches).

Lines are the file's own lines (a text file iterates on newlines only: `str.splitlines()` would also break at U+2028
and U+0085, which JSON strings may carry unescaped — one GSM8K question does), blank lines are skipped, and a bad
line is named by `file:line` with the parser's reason. The json module parses; this only fixes the reading rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

__all__ = ["JsonlError", "iter_jsonl"]


class JsonlError(ValueError):
    """A line that is not JSON: `str(err)` is `"<file>:<line>: invalid JSON (<reason> at column <n>)"`."""

    def __init__(self, path: Path, line_no: int, reason: str) -> None:
        super().__init__(f"{path}:{line_no}: invalid JSON ({reason})")
        self.path, self.line_no, self.reason = path, line_no, reason


def iter_jsonl(path: str | Path, errors: Literal["raise", "yield"] = "raise") -> Iterator[tuple[int, Any]]:
    """`(line number, parsed value)` per non-blank line. A line that is not JSON raises `JsonlError`, or with
    `errors="yield"` comes back as `(line number, JsonlError)` so the caller decides (skip a torn cache line,
    count a bad dataset row)."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                err = JsonlError(path, line_no, f"{e.msg} at column {e.colno}")
                if errors == "raise":
                    raise err from None
                yield line_no, err
                continue
            yield line_no, value
