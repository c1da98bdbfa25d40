"""SQLite cache of teacher completions: a teacher is never paid twice for the same sample.

Key = sha256 of (teacher kind, model, full prompt messages, sampling params, sample index). A completion is written
and committed the moment it arrives (WAL journal, synchronous=NORMAL: a committed row survives `kill -9` of the
process), so a killed run loses only the calls that were in flight. Only complete, parsed completions are written:
failed or malformed responses (`Completion.error`) never get a row, so a re-run asks for them again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from reasonlite.teachers.base import Completion, OnSample, Teacher, TeacherPrompt

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    created REAL NOT NULL
)
"""


def cache_key(kind: str, model: str, messages: list[dict], params: dict, sample_index: int) -> str:
    blob = json.dumps({"kind": kind, "model": model, "messages": messages, "params": params, "sample": sample_index},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class CompletionCache:
    """One SQLite file, safe to share between runs (and between processes: SQLite locks it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per arriving response
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound variables per statement
            chunk = keys[start:start + 500]
            rows = self._db.execute(
                f"SELECT key, text, prompt_tokens, completion_tokens, finish_reason FROM completions "
                f"WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for key, text, pt, ct, fr in rows:
                found[key] = Completion(text=text, prompt_tokens=pt, completion_tokens=ct, finish_reason=fr,
                                        cached=True)
        return found

    def put_many(self, rows: list[tuple[str, str, str, int, Completion]]) -> None:
        """rows: (key, kind, model, sample_index, completion); written and committed in one transaction."""
        good = [r for r in rows if r[4].error is None and isinstance(r[4].text, str)]
        if not good:
            return
        now = time.time()
        with self._db:  # BEGIN ... COMMIT (ROLLBACK on error: never a half-written batch)
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(key, kind, model, idx, c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason, now)
                 for key, kind, model, idx, c in good])

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        self._db.close()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    calls: int = 0  # teacher requests actually made
    tokens_saved: int = 0  # prompt + completion tokens of the hits (see `tokens_counted_with`)
    tokens_counted_with: str = "teacher-reported usage"
    teacher_errors: int = 0  # samples that failed non-fatally (malformed responses): not cached, status no_answer

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "calls": self.calls,
                "est_tokens_saved": self.tokens_saved, "tokens_counted_with": self.tokens_counted_with,
                "teacher_errors": self.teacher_errors}


async def complete_cached(teacher: Teacher, cache: CompletionCache | None, prompts: list[TeacherPrompt], k: int,
                          on_sample: OnSample | None = None, count_tokens=None) -> tuple[list[list[Completion]], CacheStats]:
    """k completions per prompt: cached ones from SQLite, the rest from the teacher (each stored as it arrives).

    `count_tokens(text) -> int` estimates tokens of a hit when the teacher reported no usage (student tokenizer).
    """
    stats = CacheStats()
    results: list[list[Completion | None]] = [[None] * k for _ in prompts]
    if cache is None:
        wanted = [list(range(k)) for _ in prompts]
        keys: list[list[str]] = [[""] * k for _ in prompts]
    else:
        keys = [[cache_key(teacher.kind, teacher.model_id, p.messages, teacher.params, s) for s in range(k)]
                for p in prompts]
        found = cache.get_many([key for row in keys for key in row])
        wanted = []
        estimated = False
        for i, row in enumerate(keys):
            missing = []
            for s, key in enumerate(row):
                hit = found.get(key)
                if hit is None:
                    missing.append(s)
                    continue
                results[i][s] = hit
                stats.hits += 1
                pt, ct = hit.prompt_tokens, hit.completion_tokens
                if (pt is None or ct is None) and count_tokens is not None:
                    estimated = True
                    pt = pt if pt is not None else sum(count_tokens(m["content"]) for m in prompts[i].messages)
                    ct = ct if ct is not None else count_tokens(hit.text)
                stats.tokens_saved += (pt or 0) + (ct or 0)
                if on_sample is not None:
                    on_sample(i, s, hit)
            wanted.append(missing)
        if estimated:
            stats.tokens_counted_with = "teacher-reported usage, else the student tokenizer"

    def store(i: int, s: int, completion: Completion) -> None:
        results[i][s] = completion
        if completion.error is not None:
            stats.teacher_errors += 1
        elif cache is not None:
            cache.put_many([(keys[i][s], teacher.kind, teacher.model_id, s, completion)])
        if on_sample is not None:
            on_sample(i, s, completion)

    todo = [i for i, w in enumerate(wanted) if w]
    stats.misses = sum(len(wanted[i]) for i in todo)
    calls_before = teacher.calls
    if todo:
        await teacher.complete([prompts[i] for i in todo], [wanted[i] for i in todo],
                               lambda j, s, c: store(todo[j], s, c))
    stats.calls = teacher.calls - calls_before
    return [[c for c in row] for row in results], stats  # type: ignore[misc]
