"""Word n-grams: the unit of every contamination and near-duplicate check (augmentation, synthesis)."""

from __future__ import annotations

import re


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The text's lower-cased word n-grams; a text shorter than n words is one gram (so an exact short copy still
    matches). GPT-3's decontamination used 13-grams."""
    words = re.findall(r"[a-z]+|\d+(?:\.\d+)?", text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
