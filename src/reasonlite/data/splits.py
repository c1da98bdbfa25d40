"""The splits a config's `data` section stands for: train, test (same distribution) and, for retail-math,
test_heldout_families (story families never trained on; alias test_heldout_templates) and test_reworded (trained
structures in phrasings never trained on); for retail-docs, test (products and prices never trained on) and
test_heldout_kinds (question kinds never trained on)."""

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
    named = cfg.program_names
    return {"train": load_gsm8k(folder / "train.jsonl", named=named)[: cfg.n_train],
            "test": load_gsm8k(folder / "test.jsonl", named=named)[: cfg.n_test]}


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
    """train/test(/test_heldout_families/test_reworded) for the configured source; `test_path` replaces the test
    split."""
    if cfg.source == "retail_math":
        from reasonlite.data.retail_math import retail_math_splits

        splits = retail_math_splits(cfg.n_train, cfg.n_test, seed=cfg.seed, heldout_families=cfg.heldout_families,
                                    n_test_heldout=cfg.n_test_heldout_families, n_test_reworded=cfg.n_test_reworded,
                                    distractors=cfg.distractors, vary_wording=cfg.vary_wording,
                                    vary_order=cfg.vary_order, vary_vocabulary=cfg.vary_vocabulary,
                                    n_wordings=cfg.n_wordings)
    elif cfg.source == "retail_docs":
        from reasonlite.data.retail_docs import retail_docs_splits

        splits = retail_docs_splits(cfg.n_train, cfg.n_test, seed=cfg.seed, heldout_kinds=cfg.heldout_kinds,
                                    n_test_heldout=cfg.n_test_heldout_kinds, kinds=cfg.kinds)
    elif cfg.source == "gsm8k":
        splits = _gsm8k_splits(cfg)
    elif Path(cfg.source).suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow") or Path(cfg.source).is_dir():
        splits = _file_splits(cfg)
    else:
        raise ValueError(f"data.source '{cfg.source}' is not retail_math, retail_docs, gsm8k or a .jsonl/.csv/.parquet "
                         "path")
    if cfg.test_path:
        from reasonlite.data.loaders import load_examples

        splits = {"train": splits["train"], "test": load_examples(cfg.test_path, mapping=cfg.field_mapping,
                                                                  on_bad=cfg.on_bad_rows)[: cfg.n_test]}
    if cfg.mix:
        splits = _with_mix(cfg, splits)
    if not splits["train"]:
        raise ValueError(f"data.source '{cfg.source}' gave no training examples; check data.n_train and the file")
    return splits


def _with_mix(cfg: DataConfig, splits: dict[str, list[Example]]) -> dict[str, list[Example]]:
    """Add each `data.mix` source: round(weight * n_train) of its training questions join the training set (shuffled
    in with `data.seed`), and its eval splits are added as '<name>:<split>' so each source is reported on its own."""
    out = dict(splits)
    train = list(splits["train"])
    for mix in cfg.mix:
        n_train = round(mix.weight * cfg.n_train)
        sub = cfg.model_copy(update={"source": mix.source, "path": mix.path, "mix": [], "test_path": None,
                                     "n_train": max(n_train, 1), "n_test": mix.n_test or cfg.n_test,
                                     "field_mapping": mix.field_mapping})
        if mix.label in {m.label for m in cfg.mix if m is not mix}:
            raise ValueError(f"data.mix: two sources are named '{mix.label}'; give one a `name:`")
        mixed = load_splits(sub)
        train += mixed["train"][:n_train]
        seen: list[list[Example]] = []
        for name, rows in mixed.items():
            if name == "train" or any(rows is s for s in seen):  # an alias of a split already added
                continue
            seen.append(rows)
            out[f"{mix.label}:{name}"] = rows
    random.Random(f"mix:{cfg.seed}").shuffle(train)
    out["train"] = train
    return out
