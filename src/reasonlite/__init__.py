"""ReasonLite: distil reasoning into small language models.

`import reasonlite` stays light (no torch); the heavy public objects load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Solution", "Student"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy exports: `reasonlite.Student` imports the inference engine (and torch) only when first touched.
    if name in ("Student", "Solution"):
        from reasonlite import infer

        return getattr(infer, name)
    raise AttributeError(f"module 'reasonlite' has no attribute {name!r}")
