"""Teachers behind one protocol (`dataset`, `hf`, `openai`) and the SQLite completion cache.

`make_teacher(cfg.teacher, style=...)` builds the configured teacher; `complete_cached` asks it only for samples the
`CompletionCache` does not hold yet.
"""

from __future__ import annotations

from reasonlite.config import TeacherConfig
from reasonlite.teachers.base import Completion, OnSample, Teacher, TeacherError, TeacherPrompt
from reasonlite.teachers.cache import CacheStats, CompletionCache, cache_key, complete_cached

__all__ = [
    "TEACHERS",
    "CacheStats",
    "Completion",
    "CompletionCache",
    "OnSample",
    "Teacher",
    "TeacherError",
    "TeacherPrompt",
    "cache_key",
    "complete_cached",
    "make_teacher",
]

TEACHERS = ("dataset", "hf", "openai")


def make_teacher(cfg: TeacherConfig, style: str = "pal", seed: int = 0) -> Teacher:
    """The teacher `cfg.kind` names. `style` is needed by the dataset teacher (it renders the gold in that style)."""
    if cfg.kind == "dataset":
        from reasonlite.teachers.dataset import DatasetTeacher

        return DatasetTeacher(style)
    if cfg.kind == "hf":
        from reasonlite.teachers.hf import HFTeacher

        return HFTeacher(cfg, style=style, seed=seed)
    if cfg.kind == "openai":
        from reasonlite.teachers.openai import OpenAITeacher

        return OpenAITeacher(cfg)
    raise ValueError(f"unknown teacher.kind '{cfg.kind}': use one of {', '.join(TEACHERS)}")
