"""The embedded context store: files, vector stores, chunks, vectors and a BM25 index in ONE SQLite file.

    files(id, filename, purpose, bytes, data, created_at)
    vector_stores(id, name, metadata, created_at)
    store_files(store_id, file_id, status, attributes, chunking, usage_bytes, last_error, created_at)
    file_batches(id, store_id, status, created_at)      batch_files(batch_id, position, file_id, attributes, chunking)
    batch_leases(batch_id, owner, expires_at)           which worker runs a batch, until when (the database's clock)
    chunks(id, store_id, file_id, position, text, vector)          vector: float32 bytes, unit length
    chunks_fts (FTS5 over chunks.text, BM25 ranking)

WAL mode, so two gateway workers can share the file (one writer at a time, readers never blocked). A file is indexed
in one transaction (its chunks, their vectors and its `completed` status together): a crash mid-file leaves no partial
chunks, only the `in_progress` row, and attaching the file again indexes it from the start. Search fuses the dense
ranking (cosine over the store's vectors, numpy, held in memory until the store changes; a flat index is exact) with
BM25 from FTS5 over the top candidates of each: score = hybrid_weight * cosine + (1 - hybrid_weight) * bm25
normalised to the best BM25 hit. With `diversity` > 0 (`context.diversity`, default 0) the results are then picked
from a pool four times their number by maximal marginal relevance: a question that needs a product's catalog page and
its store's return policy gets both, not the policies of six stores (docs/benchmarks.md, Context store).

A file batch is indexed file by file (`run_batch`, in the background of the worker that created it); its counts are
its files' statuses, and `cancel_batch` (from any worker: the state is in the file) marks the files not yet indexed
`cancelled`, the one being embedded included: a file completes only if it is still `in_progress` when its chunks are
written, and the running batch reads the batch's status before each file.

Only one worker runs a batch, the holder of its lease (`batch_leases`): a worker claims a batch with one upsert that
succeeds only if there is no lease, the lease is its own, or the lease expired; while it runs batches a heartbeat
thread renews its leases every `batch_lease_s / 3`. Expiry is read on the database's clock (SQLite's `julianday`,
PostgreSQL's `clock_timestamp`), so replicas need not agree on the time. A worker killed with -9 stops renewing, and
the next worker that starts (`resume_batches` at gateway start) or reads the batch (`GET .../file_batches/{id}`) once
the lease is `batch_lease_s` old claims it and indexes the files still `in_progress`: a completed, failed or cancelled
file is never embedded again, and the file that was being embedded at the kill (never committed) starts over. A
runner reads its lease with the batch's status before each file and stops if another worker took it over (it had
stalled past the lease); the completed-only-if-still-`in_progress` write keeps even that race from duplicating
chunks. A clean shutdown lets a runner finish its file and hands the lease back.

Hand-written because no maintained embedded store does both a BM25 index and vectors in one file that two processes
may open (Chroma's known multi-process hang, LanceDB's manual compaction, sqlite-vec brute force without BM25).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_fusion.errors import FusionError

log = logging.getLogger("slm_fusion")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, data BLOB NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vector_stores (id TEXT PRIMARY KEY, name TEXT, metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL, version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS store_files (store_id TEXT NOT NULL, file_id TEXT NOT NULL, status TEXT NOT NULL,
    attributes TEXT NOT NULL, chunking TEXT NOT NULL, usage_bytes INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    created_at INTEGER NOT NULL, PRIMARY KEY (store_id, file_id));
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, store_id TEXT NOT NULL, file_id TEXT NOT NULL,
    position INTEGER NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_store ON chunks (store_id, file_id);
CREATE TABLE IF NOT EXISTS file_batches (id TEXT PRIMARY KEY, store_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batch_files (batch_id TEXT NOT NULL, position INTEGER NOT NULL, file_id TEXT NOT NULL,
    attributes TEXT NOT NULL, chunking TEXT NOT NULL, PRIMARY KEY (batch_id, position));
CREATE TABLE IF NOT EXISTS batch_leases (batch_id TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
    UPDATE vector_stores SET version = version + 1 WHERE id = new.store_id; END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
    UPDATE vector_stores SET version = version + 1 WHERE id = old.store_id; END;
"""
# BM25's index: words stemmed (FTS5's Porter stemmer), so "notebooks" finds the "Aria notebook" page. A file made
# before stemming (plain unicode61) is re-indexed once when opened (`_connect`).
FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (text, content='chunks', content_rowid='id',
    tokenize='porter unicode61');
"""

TEXT_TYPES = {".txt", ".md", ".json", ".jsonl", ".csv", ".tsv", ".html", ".htm", ".py", ".yaml", ".yml", ".xml"}
AUTO_CHUNKING = {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}


class StoreError(FusionError):
    """A request the store cannot serve (400; 404 unknown id, 413 too large): answered in OpenAI's error shape."""

    type = "invalid_request_error"

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status


@dataclass
class Hit:
    file_id: str
    filename: str
    score: float
    text: str
    attributes: dict[str, Any]
    chunk_id: int


DIVERSITY_POOL = 4  # with `diversity`, MMR chooses the results among this many times as many of the best chunks


def diversify(hits: list[Hit], vectors: list[np.ndarray], k: int, diversity: float) -> list[Hit]:
    """Maximal marginal relevance (Carbonell & Goldstein 1998): repeatedly take the hit with the best
    (1 - diversity) * score - diversity * (its highest cosine to a hit already taken), so that near-copies of one page
    (six stores' return policies) do not fill every slot a question needs for its second source. Hand-written: a
    dozen lines over vectors the store already holds; the libraries that have it (LangChain) would be a framework."""
    if not hits:
        return hits
    unit = np.stack(vectors)
    sims = unit @ unit.T
    taken: list[int] = []
    closest = np.zeros(len(hits), dtype=np.float32)  # each hit's highest cosine to the hits taken so far
    left = np.ones(len(hits), dtype=bool)
    scores = np.array([h.score for h in hits], dtype=np.float32)
    while len(taken) < min(k, len(hits)):
        gain = np.where(left, (1 - diversity) * scores - diversity * closest, -np.inf)
        best = int(np.argmax(gain))
        taken.append(best)
        left[best] = False
        closest = np.maximum(closest, sims[best])
    return [hits[i] for i in taken]


def _now() -> int:
    return int(time.time())


def chunking_of(strategy: Any) -> dict[str, Any]:
    """OpenAI's `chunking_strategy` (None / auto / static) → the static form, validated (100-4096, overlap <= half)."""
    if strategy is None or (isinstance(strategy, dict) and strategy.get("type") == "auto"):
        return AUTO_CHUNKING
    static = strategy.get("static") if isinstance(strategy, dict) and strategy.get("type") == "static" else None
    if not isinstance(static, dict):
        raise StoreError("chunking_strategy must be {\"type\": \"auto\"} or {\"type\": \"static\", \"static\": "
                         "{\"max_chunk_size_tokens\": N, \"chunk_overlap_tokens\": M}}", param="chunking_strategy")
    size, overlap = static.get("max_chunk_size_tokens"), static.get("chunk_overlap_tokens", 0)
    if not isinstance(size, int) or not 100 <= size <= 4096:
        raise StoreError("chunking_strategy.static.max_chunk_size_tokens must be 100..4096", param="chunking_strategy")
    if not isinstance(overlap, int) or not 0 <= overlap <= size // 2:
        raise StoreError("chunking_strategy.static.chunk_overlap_tokens must be 0..max_chunk_size_tokens/2",
                         param="chunking_strategy")
    return {"type": "static", "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap}}


def _attributes(attributes: Any) -> dict[str, Any]:
    attributes = attributes or {}
    if len(attributes) > 16:
        raise StoreError("attributes: at most 16 key/value pairs", param="attributes")
    return attributes


def split_text(text: str, offsets: Sequence[tuple[int, int]], size: int, overlap: int) -> list[str]:
    """Windows of `size` tokens stepping by size - overlap, cut at the tokens' character offsets."""
    if not offsets:
        return [text.strip()] if text.strip() else []
    out, start = [], 0
    while start < len(offsets):
        end = min(start + size, len(offsets))
        piece = text[offsets[start][0]:offsets[end - 1][1]].strip()
        if piece:
            out.append(piece)
        if end == len(offsets):
            break
        start = end - overlap
    return out


def pdf_text(filename: str, data: bytes) -> str:
    """The text layer of a PDF (pypdf), page after page, blank lines between pages."""
    from pypdf import PdfReader

    try:
        pages = [page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages]
    except Exception as e:  # noqa: BLE001 — pypdf raises many types on damaged or encrypted files
        raise StoreError(f"{filename} is not a readable PDF ({e}); upload an unencrypted PDF", param="file") from None
    if not any(page.strip() for page in pages):
        raise StoreError(f"{filename} has no text layer ({len(pages)} page(s) of images?): run OCR on it first "
                         "(e.g. ocrmypdf) or upload its text", param="file")
    return "\n\n".join(page.strip() for page in pages if page.strip())


def file_text(filename: str, data: bytes) -> str:
    """The text of an uploaded file (the types `/v1/files` accepts for retrieval)."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".pdf":
        return pdf_text(filename, data)
    if suffix not in TEXT_TYPES:
        raise StoreError(f"file type {suffix or '(none)'} is not supported for retrieval; upload one of "
                         f"{', '.join(sorted(TEXT_TYPES | {'.pdf'}))}", param="file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError(f"{filename} is not UTF-8 text", param="file") from None
    if suffix in (".html", ".htm"):  # the text of the page, not its markup
        text = re.sub(r"<(script|style)\b.*?</\1>", " ", text, flags=re.DOTALL | re.IGNORECASE)
        text = re.sub(r"<[^>]+>", " ", text)
    return text


def _match(attributes: dict[str, Any], flt: Any) -> bool:
    """OpenAI's attribute filters: {type: eq|ne|gt|gte|lt|lte, key, value} and {type: and|or, filters: [...]}."""
    kind = flt.get("type")
    if kind in ("and", "or"):
        results = (_match(attributes, f) for f in flt.get("filters") or [])
        return all(results) if kind == "and" else any(results)
    have, want = attributes.get(flt.get("key")), flt.get("value")
    if kind == "eq":
        return have == want
    if kind == "ne":
        return have != want
    if have is None or isinstance(have, str) != isinstance(want, str):
        return False
    return {"gt": have > want, "gte": have >= want, "lt": have < want, "lte": have <= want}.get(kind, False)


def _query_words(query: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"\w+", query.lower())))


def _fts_query(words: Sequence[str]) -> str | None:
    return " OR ".join(f'"{w}"' for w in words) or None


def open_store(location: str | Path, embed: Callable[[list[str]], np.ndarray],
               tokenize: Callable[[str], list[tuple[int, int]]], max_file_bytes: int = 20_000_000,
               **options: Any) -> ContextStore:
    """The store at `location`: a postgresql:// URL (PostgreSQL + pgvector, slm_fusion.context.pgvector: several
    gateway replicas share it; `vector_index` chooses exact or HNSW search there), else a SQLite file.
    `batch_lease_s`: see the module doc."""
    if str(location).startswith(("postgresql:", "postgresql+psycopg2:")):
        from slm_fusion.context.pgvector import PgContextStore

        return PgContextStore(str(location), embed, tokenize, max_file_bytes, **options)
    options.pop("vector_index", None)  # the SQLite store's flat index is exact: there is nothing to choose
    return ContextStore(location, embed, tokenize, max_file_bytes, **options)


class ContextStore:
    """Files and vector stores in one SQLite file (see the module doc). Methods are blocking: call them in a thread.
    The database primitives (`_connect`, `_q`, `_tx`, `_dense`, `_lexical`, `_vector_value`, `_stored_vector`,
    `UPSERT_STORE_FILE`,
    `NOW`) are all another database has to replace (context.pgvector); the rest is plain SQL both speak."""

    def __init__(self, path: str | Path, embed: Callable[[list[str]], np.ndarray],
                 tokenize: Callable[[str], list[tuple[int, int]]], max_file_bytes: int = 20_000_000,
                 batch_lease_s: float = 30.0) -> None:
        self.path = Path(path)
        self.location = str(path)  # what `slm-fusion store` prints: the file, or the database URL
        self.embed, self.tokenize, self.max_file_bytes = embed, tokenize, max_file_bytes
        self.batch_lease_s = batch_lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this store's batch leases
        self._running: dict[str, threading.Thread] = {}  # batch id -> the thread of this process running it
        self._closed = threading.Event()  # stops the heartbeat; runners stop at their next file
        self._heartbeat: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple, np.ndarray, np.ndarray]] = {}  # store id -> (version, ids, vectors)
        self._cache_lock = threading.Lock()  # one thread loads a store's vectors; the others wait for them
        self._term_cache: tuple[tuple | None, int, dict[str, int]] = (None, 0, {})  # (versions, chunks, word -> chunks)
        # The keyword side of a search runs on this one thread (and its own connection) while the calling thread
        # embeds the query and computes the dense side: both release the GIL, so the two overlap on two cores.
        self._keyword = ThreadPoolExecutor(max_workers=1, thread_name_prefix="context-keyword")
        self._connect()

    # -- the database: what another backend (context.pgvector) replaces ----------------------------------------------
    UPSERT_STORE_FILE = "INSERT OR REPLACE INTO store_files VALUES (?, ?, 'in_progress', ?, ?, 0, NULL, ?)"
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"  # the database's clock, in Unix seconds (leases)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db, self._side = self._sqlite(), self._sqlite()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            self._db.execute("BEGIN IMMEDIATE")  # two workers opening an unstemmed file: one re-indexes it
            try:
                row = self._db.execute("SELECT sql FROM sqlite_master WHERE name = 'chunks_fts'").fetchone()
                if row is not None and "porter" not in row[0]:
                    self._db.execute("DROP TABLE IF EXISTS chunks_fts_terms")  # the fts5vocab table of old files
                    self._db.execute("DROP TABLE chunks_fts")
                self._db.execute(FTS_SCHEMA)
                if row is not None and "porter" not in row[0]:
                    self._db.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild')")
                    log.info("context store %s: keyword index rebuilt with stemming", self.path)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _sqlite(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def close(self) -> None:
        """Close the connections once this process's batch runners finished their current file (or after
        `batch_lease_s`: a runner still embedding is left to fail, and its batch to the next worker)."""
        self._closed.set()
        for runner in list(self._running.values()):
            runner.join(self.batch_lease_s)
        self._keyword.shutdown()
        self._db.close()
        self._side.close()

    def _q(self, sql: str, args: Sequence[Any] = (), side: bool = False) -> list[Any]:
        """Rows of one statement (each readable as row["column"]); `?` marks the arguments. `side`: on the second
        connection, which only the keyword thread (`self._keyword`) uses, so no lock."""
        if side:
            return self._side.execute(sql, args).fetchall()
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Callable[..., int]]:
        """One write transaction: yields run(sql, args, many=False) -> rows changed; rolled back on an error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield lambda sql, args=(), many=False: (self._db.executemany if many else self._db.execute)(
                    sql, args).rowcount
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _vector_value(self, vector: np.ndarray) -> Any:
        return np.asarray(vector, dtype=np.float32).tobytes()

    def _stored_vector(self, value: Any) -> np.ndarray:
        """The inverse of `_vector_value`: a `chunks.vector` as read back, as float32."""
        return np.frombuffer(value, dtype=np.float32)

    # -- files ------------------------------------------------------------------------------------------------------
    def add_file(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        if len(data) > self.max_file_bytes:
            raise StoreError(f"{filename} is {len(data)} bytes; the limit is {self.max_file_bytes} "
                             "(context.max_file_bytes)", status=413, param="file")
        file_text(filename, data)  # refuse what could never be indexed now, not at attach time
        fid = f"file-{uuid.uuid4().hex[:24]}"
        self._q("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", (fid, filename, purpose, len(data), data, _now()))
        return self.file(fid)

    def file(self, fid: str) -> dict[str, Any]:
        rows = self._q("SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = ?", (fid,))
        if not rows:
            raise StoreError(f"No file with id '{fid}'", status=404, param="file_id")
        return dict(rows[0])

    def files(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._q("SELECT id, filename, purpose, bytes, created_at FROM files "
                                         "ORDER BY created_at DESC, id")]

    def file_content(self, fid: str) -> bytes:
        self.file(fid)
        return bytes(self._q("SELECT data FROM files WHERE id = ?", (fid,))[0]["data"])

    def delete_file(self, fid: str) -> None:
        self.file(fid)
        with self._tx() as run:  # the file leaves every store it was in, chunks and all
            run("DELETE FROM chunks WHERE file_id = ?", (fid,))
            run("DELETE FROM store_files WHERE file_id = ?", (fid,))
            run("DELETE FROM files WHERE id = ?", (fid,))

    # -- vector stores ----------------------------------------------------------------------------------------------
    def create_store(self, name: str | None, metadata: dict[str, Any] | None) -> dict[str, Any]:
        sid = f"vs_{uuid.uuid4().hex[:24]}"
        self._q("INSERT INTO vector_stores VALUES (?, ?, ?, ?, 0)", (sid, name, json.dumps(metadata or {}), _now()))
        return self.store(sid)

    def store(self, sid: str) -> dict[str, Any]:
        rows = self._q("SELECT * FROM vector_stores WHERE id = ?", (sid,))
        if not rows:
            raise StoreError(f"No vector store with id '{sid}'", status=404, param="vector_store_id")
        counts = {r["status"]: r["n"] for r in self._q(
            "SELECT status, count(*) AS n FROM store_files WHERE store_id = ? GROUP BY status", (sid,))}
        usage = self._q("SELECT CAST(coalesce(sum(usage_bytes), 0) AS BIGINT) AS b FROM store_files WHERE "
                        "store_id = ?", (sid,))
        return {**{k: rows[0][k] for k in ("id", "name", "created_at")}, "metadata": json.loads(rows[0]["metadata"]),
                "file_counts": counts,
                "usage_bytes": usage[0]["b"]}

    def stores(self) -> list[dict[str, Any]]:
        return [self.store(r["id"]) for r in self._q("SELECT id FROM vector_stores ORDER BY created_at DESC, id")]

    def delete_store(self, sid: str) -> None:
        self.store(sid)
        with self._tx() as run:
            run("DELETE FROM chunks WHERE store_id = ?", (sid,))
            run("DELETE FROM store_files WHERE store_id = ?", (sid,))
            run("DELETE FROM batch_files WHERE batch_id IN (SELECT id FROM file_batches WHERE store_id = ?)", (sid,))
            run("DELETE FROM batch_leases WHERE batch_id IN (SELECT id FROM file_batches WHERE store_id = ?)", (sid,))
            run("DELETE FROM file_batches WHERE store_id = ?", (sid,))
            run("DELETE FROM vector_stores WHERE id = ?", (sid,))

    # -- indexing ---------------------------------------------------------------------------------------------------
    def attach(self, sid: str, fid: str, attributes: dict[str, Any] | None = None,
               chunking_strategy: Any = None) -> dict[str, Any]:
        """Chunk, embed and index a file into a store (again from the start if it was there)."""
        self.store(sid)
        self.file(fid)
        attributes, chunking = _attributes(attributes), chunking_of(chunking_strategy)
        with self._tx() as run:
            run(self.UPSERT_STORE_FILE, (sid, fid, json.dumps(attributes), json.dumps(chunking), _now()))
        self._index(sid, fid)
        return self.store_file(sid, fid)

    def _index(self, sid: str, fid: str) -> bool:
        """Chunk, embed and index a store's `in_progress` file with its own chunking; False when it was cancelled
        meanwhile: it stays `cancelled`, without chunks, so what a cancelled batch reported never changes after."""
        static = self.store_file(sid, fid)["chunking"]["static"]
        text = file_text(self.file(fid)["filename"], self.file_content(fid))
        pieces = split_text(text, self.tokenize(text), static["max_chunk_size_tokens"], static["chunk_overlap_tokens"])
        vectors = self.embed(pieces) if pieces else np.zeros((0, 1), dtype=np.float32)
        with self._tx() as run:  # the completed status, chunks and vectors in one transaction
            if not run("UPDATE store_files SET status = 'completed', usage_bytes = ? WHERE store_id = ? AND "
                       "file_id = ? AND status = 'in_progress'", (sum(len(t.encode()) for t in pieces), sid, fid)):
                return False
            run("DELETE FROM chunks WHERE store_id = ? AND file_id = ?", (sid, fid))
            if pieces:
                run("INSERT INTO chunks (store_id, file_id, position, text, vector) VALUES (?, ?, ?, ?, ?)",
                    [(sid, fid, i, t, self._vector_value(v)) for i, (t, v) in enumerate(zip(pieces, vectors))],
                    many=True)
        return True

    def chunk_count(self, sid: str) -> int:
        return self._q("SELECT count(*) AS n FROM chunks WHERE store_id = ?", (sid,))[0]["n"]

    # -- file batches -----------------------------------------------------------------------------------------------
    def create_batch(self, sid: str, entries: Sequence[tuple[str, Any, Any]]) -> dict[str, Any]:
        """A batch of (file id, attributes, chunking_strategy), checked whole before anything is written; its files
        are `in_progress` in the store until `run_batch` indexes them."""
        self.store(sid)
        if not entries:
            raise StoreError("file_batches: give file_ids (or files) with at least one id", param="file_ids")
        rows = []
        for fid, attributes, strategy in entries:
            self.file(fid)
            rows.append((fid, json.dumps(_attributes(attributes)), json.dumps(chunking_of(strategy))))
        bid, now = f"vsfb_{uuid.uuid4().hex[:24]}", _now()
        with self._tx() as run:
            run("INSERT INTO file_batches VALUES (?, ?, 'in_progress', ?)", (bid, sid, now))
            run("INSERT INTO batch_files VALUES (?, ?, ?, ?, ?)", [(bid, i, *row) for i, row in enumerate(rows)],
                many=True)
            run(self.UPSERT_STORE_FILE, [(sid, fid, attrs, chunking, now) for fid, attrs, chunking in rows],
                many=True)
        return self.batch(sid, bid)

    def run_batch(self, bid: str, claimed: bool = False) -> dict[str, Any]:
        """Index a batch's files still `in_progress`, in order, if this worker holds or can take its lease (else
        another live worker runs it: nothing is done); stops when the batch is cancelled or its lease was taken over.
        A file that cannot be indexed is `failed` with its reason, and the batch goes on. `claimed`: the caller
        (`start_batch`) has just taken the lease."""
        sid = self._batch_row(None, bid)["store_id"]
        with self._lock:
            if bid in self._running and self._running[bid] is not threading.current_thread():
                return self.batch(sid, bid)  # this process runs it already
            self._running[bid] = threading.current_thread()
        try:
            if claimed or self._claim(bid):
                self._run_claimed(sid, bid)
        finally:
            with self._lock:
                self._running.pop(bid, None)
        return self.batch(sid, bid)

    def _run_claimed(self, sid: str, bid: str) -> None:
        self._start_heartbeat()
        try:
            for entry in self._q("SELECT b.file_id, s.status FROM batch_files b LEFT JOIN store_files s ON "
                                 "s.store_id = ? AND s.file_id = b.file_id WHERE b.batch_id = ? ORDER BY b.position",
                                 (sid, bid)):
                if entry["status"] != "in_progress":
                    continue  # done before (a resumed batch), or detached: never embedded again
                if self._closed.is_set() or not self._holds(bid):
                    return  # shutting down, cancelled, deleted, or taken over by another worker
                try:  # the file's row, attributes and chunking were written by create_batch
                    self._index(sid, entry["file_id"])
                except Exception as e:  # noqa: BLE001 — one file's failure is recorded on it, not raised
                    if self._closed.is_set():
                        return  # the connection closed under the file (shutdown): it stays in_progress
                    self._q("UPDATE store_files SET status = 'failed', last_error = ? WHERE store_id = ? AND "
                            "file_id = ? AND status = 'in_progress'", (str(e), sid, entry["file_id"]))
            if self._holds(bid):
                self._q("UPDATE file_batches SET status = 'completed' WHERE id = ? AND status = 'in_progress'", (bid,))
        finally:  # hand the lease back (best effort: at a shutdown the connection may be closed; it expires anyway)
            with contextlib.suppress(Exception):
                self._q("DELETE FROM batch_leases WHERE batch_id = ? AND owner = ?", (bid, self.owner))

    def _claim(self, bid: str) -> bool:
        """Take the batch's lease: True if there was none, it was this worker's, or it expired (see the module doc)."""
        with self._tx() as run:
            return run(f"INSERT INTO batch_leases VALUES (?, ?, {self.NOW} + ?) ON CONFLICT (batch_id) DO UPDATE SET "
                       f"owner = excluded.owner, expires_at = excluded.expires_at WHERE batch_leases.owner = "
                       f"excluded.owner OR batch_leases.expires_at < {self.NOW}", (bid, self.owner,
                                                                                    self.batch_lease_s)) == 1

    def _holds(self, bid: str) -> bool:
        """The batch is still in progress and its lease is this worker's."""
        rows = self._q("SELECT b.status, l.owner FROM file_batches b LEFT JOIN batch_leases l ON l.batch_id = b.id "
                       "WHERE b.id = ?", (bid,))
        return bool(rows) and rows[0]["status"] == "in_progress" and rows[0]["owner"] == self.owner

    def _start_heartbeat(self) -> None:
        with self._lock:
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._renew_leases, name="context-batch-leases", daemon=True)
                self._heartbeat.start()

    def _renew_leases(self) -> None:
        while not self._closed.wait(self.batch_lease_s / 3):
            with contextlib.suppress(Exception):  # a busy database: the next beat renews (a lease outlives 3)
                self._q(f"UPDATE batch_leases SET expires_at = {self.NOW} + ? WHERE owner = ?",
                        (self.batch_lease_s, self.owner))

    def start_batch(self, bid: str) -> bool:
        """Run the batch in a background thread of this worker if no live worker holds its lease (False: one does)."""
        with self._lock:
            if bid in self._running:
                return False
        if self._closed.is_set() or not self._claim(bid):
            return False
        thread = threading.Thread(target=self._run_in_background, args=(bid,), name=f"context-{bid}", daemon=True)
        with self._lock:
            if bid in self._running:
                return False
            self._running[bid] = thread
        thread.start()
        return True

    def _run_in_background(self, bid: str) -> None:
        try:
            self.run_batch(bid, claimed=True)
        except Exception:  # the batch stays in the database: its lease expires and another worker resumes it
            log.exception("file batch %s stopped; the next worker that starts or reads it resumes it", bid)

    def resume_batches(self, bid: str | None = None) -> list[str]:
        """Start in the background the unfinished batches (or batch `bid`) whose runner is gone: no lease, or one
        not renewed for `batch_lease_s`. Returns the ids started here."""
        rows = self._q(f"SELECT b.id FROM file_batches b LEFT JOIN batch_leases l ON l.batch_id = b.id WHERE "
                       f"b.status = 'in_progress' AND (l.batch_id IS NULL OR l.expires_at < {self.NOW})"
                       + (" AND b.id = ?" if bid else "") + " ORDER BY b.created_at, b.id", (bid,) if bid else ())
        return [r["id"] for r in rows if self.start_batch(r["id"])]

    def cancel_batch(self, sid: str, bid: str) -> dict[str, Any]:
        """Stop a batch: its files not yet indexed become `cancelled`, the one being embedded included (its
        chunks are never written), so the counts this returns are final."""
        self._batch_row(sid, bid)
        with self._tx() as run:
            if run("UPDATE file_batches SET status = 'cancelled' WHERE id = ? AND status = 'in_progress'", (bid,)):
                run("UPDATE store_files SET status = 'cancelled' WHERE store_id = ? AND status = 'in_progress' AND "
                    "file_id IN (SELECT file_id FROM batch_files WHERE batch_id = ?)", (sid, bid))
        return self.batch(sid, bid)

    def _batch_row(self, sid: str | None, bid: str) -> sqlite3.Row:
        rows = self._q("SELECT * FROM file_batches WHERE id = ?", (bid,))
        if not rows or (sid is not None and rows[0]["store_id"] != sid):
            raise StoreError(f"No file batch with id '{bid}' in vector store '{sid}'", status=404, param="batch_id")
        return rows[0]

    def batch(self, sid: str, bid: str) -> dict[str, Any]:
        row = self._batch_row(sid, bid)
        counts = {r["status"]: r["n"] for r in self._q(
            "SELECT s.status, count(*) AS n FROM batch_files b JOIN store_files s ON s.store_id = ? AND s.file_id = "
            "b.file_id WHERE b.batch_id = ? GROUP BY s.status", (sid, bid))}
        return {**dict(row), "file_counts": counts}

    def batch_files(self, sid: str, bid: str, status: str | None = None) -> list[dict[str, Any]]:
        self._batch_row(sid, bid)
        files = [self.store_file(sid, r["file_id"]) for r in self._q(
            "SELECT b.file_id FROM batch_files b JOIN store_files s ON s.store_id = ? AND s.file_id = b.file_id "
            "WHERE b.batch_id = ? ORDER BY b.position", (sid, bid))]
        return [f for f in files if status is None or f["status"] == status]

    def store_file(self, sid: str, fid: str) -> dict[str, Any]:
        rows = self._q("SELECT * FROM store_files WHERE store_id = ? AND file_id = ?", (sid, fid))
        if not rows:
            raise StoreError(f"File '{fid}' is not in vector store '{sid}'", status=404, param="file_id")
        r = dict(rows[0])
        return {**r, "attributes": json.loads(r["attributes"]), "chunking": json.loads(r["chunking"])}

    def store_files(self, sid: str) -> list[dict[str, Any]]:
        self.store(sid)
        return [self.store_file(sid, r["file_id"]) for r in self._q(
            "SELECT file_id FROM store_files WHERE store_id = ? ORDER BY created_at DESC, file_id", (sid,))]

    def detach(self, sid: str, fid: str) -> None:
        self.store_file(sid, fid)
        with self._tx() as run:
            run("DELETE FROM chunks WHERE store_id = ? AND file_id = ?", (sid, fid))
            run("DELETE FROM store_files WHERE store_id = ? AND file_id = ?", (sid, fid))

    # -- search -----------------------------------------------------------------------------------------------------
    def _vectors(self, sid: str) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, sorted; vectors: one C-contiguous float32 matrix) of one store, cached until its chunks change
        (the store's version, bumped by the chunk triggers, is read per query: another process may have indexed)."""
        key = tuple(self._q("SELECT version FROM vector_stores WHERE id = ?", (sid,))[0])
        with self._cache_lock:
            cached = self._cache.get(sid)
            if cached is None or cached[0] != key:
                rows = self._q("SELECT id, vector FROM chunks WHERE store_id = ? ORDER BY id", (sid,))
                ids = np.array([r["id"] for r in rows], dtype=np.int64)
                matrix = np.frombuffer(b"".join(r["vector"] for r in rows), dtype=np.float32).reshape(len(rows), -1) \
                    if rows else np.zeros((0, 1), dtype=np.float32)
                cached = self._cache[sid] = (key, ids, matrix)
        return cached[1], cached[2]

    def _dense(self, store_ids: Sequence[str], q: np.ndarray, candidates: int) -> dict[int, float]:
        """Chunk id -> cosine (clipped to 0..1) of the `candidates` nearest chunks of each store."""
        dense: dict[int, float] = {}
        for sid in store_ids:
            ids, matrix = self._vectors(sid)
            if len(ids):
                # memory-bound (~150 MB per 100k chunks); numpy's einsum loop streams it ~1.7x faster than
                # OpenBLAS's sgemv here (8 vs 14 ms at 100k x 384), same top ranks, float32 error ~6e-8 either way
                sims = np.einsum("ij,j->i", matrix, q)
                top = np.argpartition(sims, max(len(ids) - candidates, 0))[-candidates:]
                dense.update(zip(ids[top].tolist(), np.clip(sims[top], 0, 1).tolist()))
        return dense

    def _term_docs(self, word: str, cap: int) -> int:
        """How many chunks (of every store) hold `word`, counted up to `cap` (keyword thread). Through the index's
        own query, so stemmed as the index is (~0.1 ms a word on 8.5k chunks: the doclist is read, nothing scored)."""
        return self._q("SELECT count(*) AS n FROM (SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT ?)",
                       (f'"{word}"', cap), side=True)[0]["n"]

    def _informative(self, words: list[str]) -> list[str]:
        """`words` without those in half the chunks or more, unless none would be left. BM25 gives such a word no
        weight (FTS5 clamps its idf, log((N - n + 0.5) / (n + 0.5)) <= 0, to 1e-6), but scoring it means scoring
        every chunk that holds it: natural-language queries ("how many ... the ...") match most chunks, and
        dropping those words cut a 100k-chunk keyword search from 173 to 25 ms with the same ranks. The counts
        are cached until any store's chunks change (every chunk change bumps its store's version)."""
        key = tuple((r["id"], r["version"]) for r in self._q("SELECT id, version FROM vector_stores ORDER BY id",
                                                             side=True))
        with self._cache_lock:
            if self._term_cache[0] != key:
                total = self._q("SELECT count(*) AS n FROM chunks", side=True)[0]["n"]
                self._term_cache = (key, total, {})
            _, total, docs = self._term_cache
        half = (total + 1) // 2  # 2 * n >= total exactly when n >= half
        for word in words:
            if word not in docs:
                docs[word] = self._term_docs(word, half)
        kept = [w for w in words if docs[w] < half]
        return kept or words

    def _lexical(self, store_ids: Sequence[str], query: str, candidates: int) -> dict[int, float]:
        """Chunk id -> BM25 score (higher is better) of the best keyword matches in the stores (runs on the keyword
        thread)."""
        fts = _fts_query(self._informative(_query_words(query)))
        if fts is None:
            return {}
        # FTS5's own `rank` order (bm25) stops at the limit; the table holds every store's chunks, so the hits of
        # other stores are dropped here, by the stores' cached (sorted) chunk ids, before BM25 is normalised
        rows = self._q("SELECT rowid, rank FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?",
                       [fts, candidates * 4], side=True)
        found = np.array([r[0] for r in rows], dtype=np.int64)
        mine = np.zeros(len(found), dtype=bool)
        for sid in store_ids:
            ids = self._vectors(sid)[0]
            if len(ids) and len(found):
                at = np.minimum(np.searchsorted(ids, found), len(ids) - 1)
                mine |= ids[at] == found
        return {r[0]: -r[1] for r, keep in zip(rows, mine.tolist()) if keep}

    def search(self, store_ids: Sequence[str], query: str, max_results: int = 10, filters: Any = None,
               score_threshold: float = 0.0, hybrid_weight: float = 0.5, candidates: int = 200,
               diversity: float = 0.0) -> list[Hit]:
        """Best chunks of the stores for `query`: the top `candidates` of the dense ranking and of BM25, fused (see
        the module doc), then filtered by attributes and by the files' status; `diversity` > 0 picks the
        `max_results` from a wider pool by maximal marginal relevance (`diversify`)."""
        known = {r["id"] for r in self._q(f"SELECT id FROM vector_stores WHERE id IN ({','.join('?' * len(store_ids))})",
                                           list(store_ids))}
        for sid in store_ids:  # unknown ids are a 404 (store() also counts files and bytes: not needed here)
            if sid not in known:
                self.store(sid)
        keyword = self._keyword.submit(self._lexical, store_ids, query, candidates)  # meanwhile: embed + dense
        q = np.ascontiguousarray(self.embed([query])[0], dtype=np.float32)
        dense = self._dense(store_ids, q, candidates)
        bm25 = keyword.result()
        best = max(bm25.values(), default=0.0)
        fused = {cid: hybrid_weight * dense.get(cid, 0.0) + (1 - hybrid_weight) * (bm25.get(cid, 0.0) / best
                                                                                    if best > 0 else 0.0)
                 for cid in dense.keys() | bm25.keys()}
        ranked = sorted((c for c in fused if fused[c] >= score_threshold), key=lambda c: -fused[c])
        hits: list[Hit] = []
        vectors: list[np.ndarray] = []
        pool = max_results if diversity <= 0 else max(DIVERSITY_POOL * max_results, 20)
        wanted, start, size = set(store_ids), 0, pool
        while start < len(ranked) and len(hits) < pool:  # texts of the best only: a pool first, more if dropped
            batch, start, size = ranked[start:start + size], start + size, 64
            # by chunk id only (the primary key): a store_id condition here makes SQLite scan the store's index
            rows = {r["id"]: r for r in self._q(
                f"SELECT c.id, c.store_id, c.file_id, c.text, f.filename, s.attributes"
                f"{', c.vector' if diversity > 0 else ''} FROM chunks c JOIN files f ON f.id = c.file_id JOIN "
                f"store_files s ON s.store_id = c.store_id AND s.file_id = c.file_id WHERE c.id "
                f"IN ({','.join('?' * len(batch))}) AND s.status = 'completed'", batch)}
            for cid in batch:
                r = rows.get(cid)
                if r is None or r["store_id"] not in wanted or (
                        filters is not None and not _match(json.loads(r["attributes"]), filters)):
                    continue
                hits.append(Hit(r["file_id"], r["filename"], round(fused[cid], 6), r["text"],
                                json.loads(r["attributes"]), cid))
                if diversity > 0:
                    vectors.append(self._stored_vector(r["vector"]))
                if len(hits) == pool:
                    break
        return diversify(hits, vectors, max_results, diversity) if diversity > 0 else hits
