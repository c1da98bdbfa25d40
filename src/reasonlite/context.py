"""Where a question's sources come from, per context mode: `none`, `gold` (the example's own `context`),
`retrieved` (the top `context.top_k` chunks of `context.vector_store`, searched with the official `openai` client's
`vector_stores.search`, so any OpenAI-compatible endpoint serves: our gateway, or OpenAI itself) or `gold_retrieved`
(the gold sources among what retrieval brings for the question: RAFT's training contexts).

The sources become the system message of `formats.build_messages`, the message the gateway's retrieval inserts too.
Search results are kept in a SQLite cache (one committed row per question, like the teacher cache), so a killed
trace build or eval searches again only for the questions it had not reached, and a rerun searches for nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from reasonlite.config import ContextConfig, ContextMode
from reasonlite.data.example import Example, Source


class ContextError(RuntimeError):
    """Sources cannot be had (no gold context, store unreachable or unknown); the message names the knob to fix."""


class RetrievalCache:
    """Search results by (endpoint, store id, top_k, query): one SQLite file, committed row by row."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS searches (key TEXT PRIMARY KEY, sources TEXT NOT NULL)")

    @staticmethod
    def key(base_url: str, store_id: str, top_k: int, query: str) -> str:
        blob = json.dumps([base_url.rstrip("/"), store_id, top_k, query], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> list[Source] | None:
        row = self._db.execute("SELECT sources FROM searches WHERE key = ?", (key,)).fetchone()
        return None if row is None else [Source.model_validate(s) for s in json.loads(row[0])]

    def put(self, key: str, sources: list[Source]) -> None:
        self._db.execute("INSERT OR REPLACE INTO searches (key, sources) VALUES (?, ?)",
                         (key, json.dumps([s.model_dump() for s in sources], ensure_ascii=False)))

    def close(self) -> None:
        self._db.close()


def default_cache_path(cfg: ContextConfig, runs_dir: str | Path) -> Path:
    """context.cache_path, else <runs_dir>/retrieval_cache.sqlite (beside the teacher cache, shared by runs)."""
    return Path(cfg.cache_path) if cfg.cache_path else Path(runs_dir) / "retrieval_cache.sqlite"


def _client(cfg: ContextConfig):
    import openai

    return openai.OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY", max_retries=2,
                         timeout=cfg.timeout_s)


def _store_id(client, cfg: ContextConfig) -> str:
    """context.vector_store as an id: a `vs_...` id as given, a name looked up among the endpoint's stores."""
    wanted = cfg.vector_store or ""
    if wanted.startswith("vs_"):
        return wanted
    matches = [s.id for s in client.vector_stores.list() if s.name == wanted]
    if len(matches) != 1:
        found = "no vector store" if not matches else f"{len(matches)} vector stores"
        raise ContextError(f"context.vector_store: {found} named '{wanted}' at {cfg.base_url}; create it with "
                           f"`slm-fusion store ingest DIR --store {wanted}` or give its vs_... id")
    return matches[0]


def retrieve(cfg: ContextConfig, queries: Sequence[str], cache_path: str | Path) -> list[list[Source]]:
    """The top `cfg.top_k` chunks for each query, best first, duplicate texts dropped (as the gateway packs them)."""
    import openai

    cache = RetrievalCache(cache_path)
    client = _client(cfg)
    try:
        store_id: str | None = None
        out: list[list[Source]] = []
        for query in queries:
            if store_id is None:
                store_id = _store_id(client, cfg)
            key = RetrievalCache.key(cfg.base_url, store_id, cfg.top_k, query)
            sources = cache.get(key)
            if sources is None:
                page = client.vector_stores.search(vector_store_id=store_id, query=query, max_num_results=cfg.top_k)
                sources, seen = [], set()
                for hit in page.data:
                    text = "".join(part.text for part in hit.content)
                    if text not in seen:
                        seen.add(text)
                        sources.append(Source(filename=hit.filename, text=text))
                cache.put(key, sources)
            out.append(sources)
        return out
    except openai.APIConnectionError as e:
        raise ContextError(f"context.base_url: cannot reach {cfg.base_url} ({e.__cause__ or e}); start the endpoint "
                           "(e.g. `slm-fusion serve gateway.yaml`) or fix the URL") from None
    except openai.AuthenticationError:
        raise ContextError(f"context.api_key_env: {cfg.base_url} refused the key in ${cfg.api_key_env}; set it to a "
                           "valid key") from None
    except openai.NotFoundError:
        raise ContextError(f"context.vector_store: {cfg.base_url} has no vector store '{cfg.vector_store}'; check the "
                           "id (`slm-fusion store list`) or the URL") from None
    finally:
        client.close()
        cache.close()


def sources_for(examples: Sequence[Example], mode: ContextMode, cfg: ContextConfig,
                runs_dir: str | Path = "runs", knob: str = "traces.context", seed: int = 0) -> list[list[Source] | None]:
    """Each example's sources in `mode` (None = no sources message). `knob` names the setting in errors; `seed`
    orders the sources of `gold_retrieved`."""
    if mode == "none":
        return [None] * len(examples)
    if mode == "gold_retrieved":
        gold = sources_for(examples, "gold", cfg, runs_dir, knob)
        retrieved = sources_for(examples, "retrieved", cfg, runs_dir, knob)
        return with_retrieved(gold, retrieved, seed)
    if mode == "gold":
        missing = [e.id for e in examples if not e.context]
        if missing:
            raise ContextError(f"{knob}: 'gold' needs each example's own context, but {len(missing)} of "
                               f"{len(examples)} have none (first: {missing[0]}); use data.source retail_docs, a file "
                               "with a `context` column, or the mode 'none'")
        return [list(e.context or []) for e in examples]
    if mode == "retrieved":
        return list(retrieve(cfg, [e.question for e in examples], default_cache_path(cfg, runs_dir)))
    raise ValueError(f"{knob}: unknown context mode '{mode}'; use none, gold, retrieved or gold_retrieved")


def with_retrieved(gold: Sequence[list[Source] | None], retrieved: Sequence[list[Source] | None],
                   seed: int) -> list[list[Source] | None]:
    """`gold_retrieved`: each question's gold sources plus the retrieved chunks that are not gold, in a seeded
    shuffled order. The distractors are the retriever's own mistakes for this very question (the similar product's
    page, another store's policy): the hard negatives RAFT (Zhang et al. 2024) trains with, where random documents
    of other questions (`with_distractors`) are easy to tell apart."""
    rng = random.Random(seed)
    out: list[list[Source] | None] = []
    for own, found in zip(gold, retrieved):
        texts = {s.text for s in own or []}
        picked = [*(own or []), *(s for s in found or [] if s.text not in texts)]
        rng.shuffle(picked)
        out.append(picked or None)
    return out


def with_distractors(contexts: Sequence[list[Source] | None], k: int, seed: int) -> list[list[Source] | None]:
    """`traces.context_distractors` (RAFT, Zhang et al. 2024): each question's gold sources plus `k` documents drawn
    from the other questions' sources, in a seeded shuffled order, so the student reads past the neighbours a
    retriever brings along (a catalog page of a similar product, another store's policy) instead of trusting the
    first source. A question without sources keeps none."""
    pool = list({s.filename: s for sources in contexts if sources for s in sources}.values())
    rng = random.Random(seed)
    out: list[list[Source] | None] = []
    for sources in contexts:
        if not sources:
            out.append(sources)
            continue
        own = {s.filename for s in sources}
        others = [s for s in pool if s.filename not in own]
        picked = [*sources, *rng.sample(others, min(k, len(others)))]
        rng.shuffle(picked)
        out.append(picked)
    return out
