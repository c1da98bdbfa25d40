"""The splits a config's `data` section stands for: train, test (same distribution) and, for retail-math,
test_heldout_templates (problem shapes never seen in training)."""

from __future__ import annotations

import random
from pathlib import Path

from reasonlite.config import DataConfig
from reasonlite.data.example import Example


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def default_gsm8k_dir() -> Path:
    """GSM8K ships in ../shared/data/gsm8k beside the repo (CI lays shared/ there too)."""
    return repo_root().parent / "shared" / "data" / "gsm8k"


def _gsm8k_splits(cfg: DataConfig) -> dict[str, list[Example]]:
    from reasonlite.data.gsm8k import load_gsm8k

    folder = Path(cfg.path) if cfg.path else default_gsm8k_dir()
    if folder.is_file():
        folder = folder.parent
    for name in ("train.jsonl", "test.jsonl"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"data.path: {folder / name} is missing; point data.path at a folder with GSM8K "
                                    "train.jsonl and test.jsonl")
    return {"train": load_gsm8k(folder / "train.jsonl")[: cfg.n_train],
            "test": load_gsm8k(folder / "test.jsonl")[: cfg.n_test]}


def _file_splits(cfg: DataConfig) -> dict[str, list[Example]]:
    from reasonlite.data.loaders import load_examples

    examples = load_examples(cfg.source, mapping=cfg.field_mapping, on_bad=cfg.on_bad_rows)
    rng = random.Random(cfg.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    shuffled = [examples[i] for i in order]
    n_test = min(cfg.n_test, max(len(shuffled) // 5, 1))
    return {"test": shuffled[:n_test], "train": shuffled[n_test: n_test + cfg.n_train]}


def load_splits(cfg: DataConfig) -> dict[str, list[Example]]:
    """train/test(/test_heldout_templates) for the configured source; `test_path` replaces the test split."""
    if cfg.source == "retail_math":
        from reasonlite.data.retail_math import retail_math_splits

        splits = retail_math_splits(cfg.n_train, cfg.n_test, seed=cfg.seed, heldout_templates=cfg.heldout_templates,
                                    n_test_heldout=cfg.n_test_heldout_templates)
    elif cfg.source == "gsm8k":
        splits = _gsm8k_splits(cfg)
    elif Path(cfg.source).suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow") or Path(cfg.source).is_dir():
        splits = _file_splits(cfg)
    else:
        raise ValueError(f"data.source '{cfg.source}' is not retail_math, gsm8k or a .jsonl/.csv/.parquet path")
    if cfg.test_path:
        from reasonlite.data.loaders import load_examples

        splits = {"train": splits["train"], "test": load_examples(cfg.test_path, mapping=cfg.field_mapping,
                                                                  on_bad=cfg.on_bad_rows)[: cfg.n_test]}
    if not splits["train"]:
        raise ValueError(f"data.source '{cfg.source}' gave no training examples; check data.n_train and the file")
    return splits
