"""SmolLM2-135M-Instruct: a few LoRA steps on retail-math gold programs, export, reload, generate."""

from __future__ import annotations

import json

import pytest
import torch

from reasonlite.config import build_config
from reasonlite.formats import build_messages
from reasonlite.train import train_student

pytestmark = pytest.mark.integration


def test_smollm2_lora_trains_and_exports(tmp_path):
    from test_train import write_trace_set

    from reasonlite.models import load_model

    traces = write_trace_set(tmp_path / "traces", n=6, style="pal")
    cfg = build_config({"student": {"model": "smollm2-135m-instruct", "lora_r": 8, "lora_alpha": 16},
                        "train": {"max_steps": 3, "batch_size": 2, "save_steps": 3, "max_length": 320}})
    result = train_student(cfg, traces, tmp_path / "train")
    assert result.steps == 3 and result.final_loss < 5  # an instruct model already likes Python
    assert (tmp_path / "train" / "checkpoints" / "checkpoint-3").is_dir()
    history = json.loads((tmp_path / "train" / "metrics.json").read_text())["loss_history"]
    assert [h["step"] for h in history] == [1, 2, 3]

    model, tok = load_model(result.export_dir, device="cpu")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    question = "A shop has 12 boxes of 6 pens and sells 20 pens. How many pens are left?"
    prompt = tok.apply_chat_template(build_messages(question, "pal"), add_generation_prompt=True, tokenize=False)
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "def " in text and "return" in text  # Python in the PAL shape (3 steps are too few to fix the name)
