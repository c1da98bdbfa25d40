"""The context store on PostgreSQL + pgvector, for several gateway replicas sharing one store.

Same tables and SQL as the SQLite store (slm_fusion.context.store); what differs is below: vectors are a pgvector
`vector` column searched in the database (`<=>`, cosine distance), the keyword side is PostgreSQL's full-text search
(a generated `tsvector` with a GIN index, ranked by `ts_rank_cd`: PostgreSQL has no BM25), and transactions are
PostgreSQL's. Each gateway process holds two connections: one used under the store's lock, and one for the keyword
side of searches (on the store's keyword thread, so it overlaps the dense side).

`vector_index` (the gateway's `context.vector_index`): `exact` (the default) scans the store's vectors; `hnsw`
creates a pgvector HNSW index, `USING hnsw ((vector::vector(D)) vector_cosine_ops)`: pgvector indexes only
fixed-dimension vectors and the column takes any, so the index is on the cast to the embedding model's dimension D
(made when the first vector is known: at connect if there are chunks, else when the first file is indexed; switching
an existing big store to hnsw builds it at the next start, minutes, once). A search then sets `hnsw.ef_search` to its candidate count, and on pgvector >= 0.8
`hnsw.iterative_scan = relaxed_order`: without it an HNSW scan returns at most ef_search rows *before* the
`store_id = ?` filter, so a store holding a small share of the table would get few or no dense candidates; with it
the scan goes on until the LIMIT is filled (up to `hnsw.max_scan_tuples`). The planner may still prefer the
`store_id` btree and an exact sort for a small store. bench_context.py measures the ANN's recall against exact.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from slm_fusion.context.store import ContextStore, StoreError, _query_words

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
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED);
CREATE INDEX IF NOT EXISTS chunks_by_store ON chunks (store_id, file_id);
CREATE INDEX IF NOT EXISTS chunks_tsv ON chunks USING gin (tsv);
CREATE TABLE IF NOT EXISTS file_batches (id TEXT PRIMARY KEY, store_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS batch_files (batch_id TEXT NOT NULL, position INTEGER NOT NULL, file_id TEXT NOT NULL,
    attributes TEXT NOT NULL, chunking TEXT NOT NULL, PRIMARY KEY (batch_id, position));
CREATE TABLE IF NOT EXISTS batch_leases (batch_id TEXT PRIMARY KEY, owner TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL);
"""
VECTOR_INDEXES = ("exact", "hnsw")
# A table made before stemming ('simple': no stems, no stop words) gets its tsv column regenerated once, at connect
STEMMED_TSV = ("ALTER TABLE chunks DROP COLUMN tsv; ALTER TABLE chunks ADD COLUMN tsv tsvector GENERATED ALWAYS AS "
               "(to_tsvector('english', text)) STORED; CREATE INDEX IF NOT EXISTS chunks_tsv ON chunks USING gin (tsv);")
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
    NOW = "extract(epoch FROM clock_timestamp())::float8"

    def __init__(self, url: str, embed: Callable[[list[str]], np.ndarray],
                 tokenize: Callable[[str], list[tuple[int, int]]], max_file_bytes: int = 20_000_000,
                 batch_lease_s: float = 30.0, vector_index: str = "exact") -> None:
        if vector_index not in VECTOR_INDEXES:
            raise StoreError(f"context.vector_index '{vector_index}' is not one of {', '.join(VECTOR_INDEXES)}",
                             param="context.vector_index")
        self.url = url.replace("postgresql+psycopg2://", "postgresql://", 1)
        self.vector_index, self._hnsw_dims = vector_index, None
        super().__init__(url, embed, tokenize, max_file_bytes, batch_lease_s)
        self.location = re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", self.url)  # never print the password

    def _connect(self) -> None:
        import psycopg2
        import psycopg2.extras
        from pgvector.psycopg2 import register_vector

        try:
            self._db, self._side = (psycopg2.connect(self.url, cursor_factory=psycopg2.extras.RealDictCursor)
                                    for _ in range(2))
        except psycopg2.Error as e:
            raise StoreError(f"cannot open the context database {self.location}: {str(e).strip()}", status=503,
                             param="context.url") from None
        self._db.autocommit = self._side.autocommit = True
        with self._lock, self._db.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
            try:
                cur.execute(SCHEMA)
                cur.execute("SELECT pg_get_expr(adbin, adrelid) AS expr FROM pg_attrdef JOIN pg_attribute ON "
                            "attrelid = adrelid AND attnum = adnum WHERE adrelid = 'chunks'::regclass AND "
                            "attname = 'tsv'")
                if "english" not in cur.fetchone()["expr"]:
                    cur.execute(STEMMED_TSV)
                cur.execute("SELECT attstorage FROM pg_attribute WHERE attrelid = 'chunks'::regclass AND attname = "
                            "'vector'")
                if cur.fetchone()["attstorage"] != "p":  # inline, never compressed: an exact scan reads it directly
                    cur.execute("ALTER TABLE chunks ALTER COLUMN vector SET STORAGE PLAIN")
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        register_vector(self._db)
        register_vector(self._side)
        version = self._q("SELECT extversion FROM pg_extension WHERE extname = 'vector'")[0]["extversion"]
        self._iterative = tuple(int(x) for x in re.findall(r"\d+", version)[:2]) >= (0, 8)
        self._hnsw_of_stored()

    def _hnsw_of_stored(self) -> None:
        """With `vector_index: hnsw`, the index for the dimension of the vectors stored, once there are some."""
        if self.vector_index == "hnsw" and self._hnsw_dims is None:
            known = self._q("SELECT vector_dims(vector) AS d FROM chunks LIMIT 1")
            if known:
                self.ensure_hnsw(known[0]["d"])

    def _index(self, sid: str, fid: str) -> bool:
        indexed = super()._index(sid, fid)
        self._hnsw_of_stored()  # the first vectors written: the index is made while the table is small
        return indexed

    def ensure_hnsw(self, dims: int) -> None:
        """The HNSW index over the vectors cast to `dims` (see the module doc), created once, replicas in turn."""
        if self._hnsw_dims == dims:
            return
        with self._lock, self._db.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
            try:
                cur.execute("SET maintenance_work_mem = '1GB'")  # the graph in memory: a build far faster than on disk
                cur.execute(f"CREATE INDEX IF NOT EXISTS chunks_hnsw_{int(dims)} ON chunks USING hnsw "
                            f"((vector::vector({int(dims)})) vector_cosine_ops)")
                cur.execute("RESET maintenance_work_mem")
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        self._hnsw_dims = dims

    def _q(self, sql: str, args: Sequence[Any] = (), side: bool = False) -> list[Any]:
        with contextlib.nullcontext() if side else self._lock, (self._side if side else self._db).cursor() as cur:
            cur.execute(_sql(sql), tuple(args))
            return cur.fetchall() if cur.description else []

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Callable[..., int]]:
        import psycopg2.extras

        with self._lock, self._db.cursor() as cur:
            cur.execute("BEGIN")

            def run(sql: str, args: Any = (), many: bool = False) -> int:
                """Rows changed (for `many`: of the last page; no caller reads it)."""
                if many:  # pages of statements in one round trip each: executemany makes one per row
                    psycopg2.extras.execute_batch(cur, _sql(sql), args, page_size=200)
                else:
                    cur.execute(_sql(sql), args)
                return cur.rowcount

            try:
                yield run
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _vector_value(self, vector: np.ndarray) -> Any:
        return np.asarray(vector, dtype=np.float32)

    def _stored_vector(self, value: Any) -> np.ndarray:
        return np.asarray(value.to_numpy(), dtype=np.float32)  # pgvector's adapter reads a `Vector`

    def _dense(self, store_ids: Sequence[str], q: np.ndarray, candidates: int) -> dict[int, float]:
        column, settings = "vector", ""
        if self.vector_index == "hnsw":  # the index's expression, and how far its scan goes (see the module doc)
            self.ensure_hnsw(len(q))
            column = f"vector::vector({len(q)})"
            settings = f"SET hnsw.ef_search = {max(int(candidates), 40)}; " + (
                "SET hnsw.iterative_scan = relaxed_order; " if self._iterative else "")
        dense: dict[int, float] = {}
        for sid in store_ids:  # nearest neighbours per store, in the database
            dense.update((r["id"], min(max(float(r["sim"]), 0.0), 1.0)) for r in self._q(
                f"{settings}SELECT id, 1 - ({column} <=> ?) AS sim FROM chunks WHERE store_id = ? ORDER BY "
                f"{column} <=> ? LIMIT ?", (q, sid, q, candidates)))
        return dense

    def _term_docs(self, word: str, cap: int) -> int:
        # a stop word ("the", "of") has no lexeme: the index never holds it, so it counts as held by every chunk
        return self._q("SELECT CASE WHEN numnode(plainto_tsquery('english', ?)) = 0 THEN ? ELSE (SELECT count(*) "
                       "FROM (SELECT 1 FROM chunks WHERE tsv @@ plainto_tsquery('english', ?) LIMIT ?) hits) END AS n",
                       (word, cap, word, cap), side=True)[0]["n"]

    def _lexical(self, store_ids: Sequence[str], query: str, candidates: int) -> dict[int, float]:
        # the same words as the SQLite store's BM25 side: ts_rank_cd has no idf, so a word in half the chunks would
        # otherwise weigh as much as a rare one, besides having every chunk that holds it ranked
        words = self._informative(_query_words(query))
        if not words:
            return {}
        marks = ",".join("?" * len(store_ids))
        return {r["id"]: float(r["rank"]) for r in self._q(
            f"SELECT id, ts_rank_cd(tsv, q) AS rank FROM chunks, to_tsquery('english', ?) q WHERE tsv @@ q AND "
            f"store_id IN ({marks}) ORDER BY rank DESC LIMIT ?", (" | ".join(words), *store_ids, candidates * 4), side=True)}
