"""The context store on PostgreSQL + pgvector, for several gateway replicas sharing one store.

Same tables and SQL as the SQLite store (slm_fusion.context.store); what differs is below: vectors are a pgvector
`vector` column searched in the database (`<=>`, cosine distance, exact: no ANN index yet), the keyword side is
PostgreSQL's full-text search (a generated `tsvector` with a GIN index, ranked by `ts_rank_cd`: PostgreSQL has no
BM25), and transactions are PostgreSQL's. Each gateway process holds one connection, used under the store's lock.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from slm_fusion.context.store import ContextStore, StoreError

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL, data BYTEA NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS vector_stores (id TEXT PRIMARY KEY, name TEXT, metadata TEXT NOT NULL,
    created_at BIGINT NOT NULL, version BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS store_files (store_id TEXT NOT NULL, file_id TEXT NOT NULL, status TEXT NOT NULL,
    attributes TEXT NOT NULL, chunking TEXT NOT NULL, usage_bytes BIGINT NOT NULL DEFAULT 0, last_error TEXT,
    created_at BIGINT NOT NULL, PRIMARY KEY (store_id, file_id));
CREATE TABLE IF NOT EXISTS chunks (id BIGSERIAL PRIMARY KEY, store_id TEXT NOT NULL, file_id TEXT NOT NULL,
    position INTEGER NOT NULL, text TEXT NOT NULL, vector vector NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED);
CREATE INDEX IF NOT EXISTS chunks_by_store ON chunks (store_id, file_id);
CREATE INDEX IF NOT EXISTS chunks_tsv ON chunks USING gin (tsv);
CREATE TABLE IF NOT EXISTS file_batches (id TEXT PRIMARY KEY, store_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS batch_files (batch_id TEXT NOT NULL, position INTEGER NOT NULL, file_id TEXT NOT NULL,
    attributes TEXT NOT NULL, chunking TEXT NOT NULL, PRIMARY KEY (batch_id, position));
"""
SCHEMA_LOCK = 0x51F05E  # pg_advisory_lock key: replicas starting together create the schema one at a time


def _sql(statement: str) -> str:
    """The SQLite store's `?` placeholders as psycopg2's `%s` (no statement of ours holds a literal ? or %)."""
    return statement.replace("?", "%s")


class PgContextStore(ContextStore):
    """Files and vector stores in a PostgreSQL database with the pgvector extension (see the module doc)."""

    UPSERT_STORE_FILE = ("INSERT INTO store_files VALUES (?, ?, 'in_progress', ?, ?, 0, NULL, ?) ON CONFLICT "
                         "(store_id, file_id) DO UPDATE SET status = 'in_progress', attributes = EXCLUDED.attributes, "
                         "chunking = EXCLUDED.chunking, usage_bytes = 0, last_error = NULL, "
                         "created_at = EXCLUDED.created_at")

    def __init__(self, url: str, embed: Callable[[list[str]], np.ndarray],
                 tokenize: Callable[[str], list[tuple[int, int]]], max_file_bytes: int = 20_000_000) -> None:
        self.url = url.replace("postgresql+psycopg2://", "postgresql://", 1)
        super().__init__(url, embed, tokenize, max_file_bytes)
        self.location = re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", self.url)  # never print the password

    def _connect(self) -> None:
        import psycopg2
        import psycopg2.extras
        from pgvector.psycopg2 import register_vector

        try:
            self._db = psycopg2.connect(self.url, cursor_factory=psycopg2.extras.RealDictCursor)
        except psycopg2.Error as e:
            raise StoreError(f"cannot open the context database {self.location}: {str(e).strip()}", status=503,
                             param="context.url") from None
        self._db.autocommit = True
        with self._lock, self._db.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
            try:
                cur.execute(SCHEMA)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        register_vector(self._db)

    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock, self._db.cursor() as cur:
            cur.execute(_sql(sql), tuple(args))
            return cur.fetchall() if cur.description else []

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Callable[..., int]]:
        with self._lock, self._db.cursor() as cur:
            cur.execute("BEGIN")

            def run(sql: str, args: Any = (), many: bool = False) -> int:
                (cur.executemany if many else cur.execute)(_sql(sql), args)
                return cur.rowcount

            try:
                yield run
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _vector_value(self, vector: np.ndarray) -> Any:
        return np.asarray(vector, dtype=np.float32)

    def _dense(self, store_ids: Sequence[str], q: np.ndarray, candidates: int) -> dict[int, float]:
        dense: dict[int, float] = {}
        for sid in store_ids:  # exact nearest neighbours per store, in the database
            dense.update((r["id"], min(max(float(r["sim"]), 0.0), 1.0)) for r in self._q(
                "SELECT id, 1 - (vector <=> ?) AS sim FROM chunks WHERE store_id = ? ORDER BY vector <=> ? LIMIT ?",
                (q, sid, q, candidates)))
        return dense

    def _lexical(self, store_ids: Sequence[str], query: str, candidates: int) -> dict[int, float]:
        words = list(dict.fromkeys(re.findall(r"\w+", query.lower())))
        if not words:
            return {}
        marks = ",".join("?" * len(store_ids))
        return {r["id"]: float(r["rank"]) for r in self._q(
            f"SELECT id, ts_rank_cd(tsv, q) AS rank FROM chunks, to_tsquery('simple', ?) q WHERE tsv @@ q AND "
            f"store_id IN ({marks}) ORDER BY rank DESC LIMIT ?", (" | ".join(words), *store_ids, candidates * 4))}
