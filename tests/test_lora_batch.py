"""Mixed-adapter batches through one gathered matmul per LoRA layer give PEFT's mixed-batch results."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear

from slm_fusion.backends.lora_batch import BatchedLoRA


@pytest.fixture
def peft_model():
    from reasonlite.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("tiny-random-llama", device="cpu")
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False),
                        adapter_name="a0")
    pm.add_adapter("a1", LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    pm.add_adapter("a2", LoraConfig(r=2, lora_alpha=4, target_modules=targets[:2], init_lora_weights=False))
    pm.eval()
    enc = tok(["hello there friend", "a b c d e", "apples and pears", "x", "the end"], return_tensors="pt",
              padding=True)
    return pm, enc


@pytest.mark.parametrize("names", [["a0", "__base__", "a1", "a0", "a1"], ["a1"] * 5, ["__base__"] * 5,
                                   ["a2", "a0", "a2", "__base__", "a1"]])
def test_gathered_lora_equals_peft_mixed_batches(peft_model, names, monkeypatch):
    pm, enc = peft_model
    with torch.inference_mode():
        want = pm(**enc, adapter_names=names).logits
        fell_back = []
        real = Linear._mixed_batch_forward

        def spy(self, *a, **k):
            fell_back.append(self)
            return real(self, *a, **k)

        monkeypatch.setattr(Linear, "_mixed_batch_forward", spy)
        BatchedLoRA(pm).install()  # PEFT's own path (spied) stays the fallback
        got = pm(**enc, adapter_names=names).logits
    # different ranks (zero-padded), base rows, an adapter on only some layers (a2: PEFT's own path there)
    assert torch.allclose(got, want, atol=1e-5)
    assert fell_back == []  # every layer took the gathered path, also those a2 does not adapt
    with torch.inference_mode(), pm.disable_adapter():
        base = pm(**enc).logits
    for row, name in enumerate(names):  # the adapters do change what their rows compute
        assert torch.allclose(got[row], base[row], atol=1e-5) == (name == "__base__")
