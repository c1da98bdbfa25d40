"""`reasonlite export RUN --gguf`: the GGUF of a Llama student answers as the HF student does, in llama-cpp-python
and through the gateway's llama.cpp backend; the Modelfile and serve.yaml beside it.

The round trip uses a seeded random Llama with SmolLM2's real tokenizer whose output head is sharp (64 live rows):
a plain random model spreads its logits evenly over 49k tokens, and greedy decoding then flips on rounding noise
that says nothing about the conversion. The integration test does the same on the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from reasonlite.cli import app
from reasonlite.config import build_config, dump_config
from reasonlite.formats import INSTRUCTIONS, build_messages
from reasonlite.gguf_export import export_gguf, export_student_gguf
from reasonlite.infer import read_student_meta
from reasonlite.models import load_model, load_tokenizer
from reasonlite.train.export import export_student

PROMPTS = ["What is 2+3?", "Tom has 5 apples and buys 7 more. How many apples does he have?", "hello",
           "A shop sells pens at $2 each. What do 7 pens cost?", "Write a program.", "x"]
NEW_TOKENS = 16


def sharp_tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("tiny-random-llama")  # SmolLM2's tokenizer and chat template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.15, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        scale = torch.full((len(tokenizer), 1), 0.01)
        scale[torch.randperm(len(tokenizer))[:64]] = 1.0
        model.lm_head.weight.mul_(scale)
    return model, tokenizer


def prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def hf_greedy(model, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def llama_greedy(llm, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if token == eos:
            break
        out.append(token)
        if len(out) == n:
            break
    return out


def open_llama(path: Path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)


@pytest.fixture(scope="module")
def sharp():
    model, tokenizer = sharp_tiny_llama()
    return model, tokenizer, {q: hf_greedy(model, prompt_ids(tokenizer, q), NEW_TOKENS) for q in PROMPTS}


def test_f16_gguf_tokenizes_and_decodes_greedily_exactly_as_transformers(sharp, tmp_path):
    model, tokenizer, expected = sharp
    llm = open_llama(export_gguf(model, tokenizer, tmp_path / "s-f16.gguf", quant="f16"))
    try:
        for q in PROMPTS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt_ids(tokenizer, q), q
            assert len(set(expected[q])) > 5  # a varied continuation: a wrong permutation or name would show
            assert llama_greedy(llm, prompt_ids(tokenizer, q), NEW_TOKENS) == expected[q], q
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    finally:
        llm.close()


def test_q8_0_stays_close_and_q4_k_m_is_quantised_by_llama_cpp(sharp, tmp_path):
    import gguf

    model, tokenizer, expected = sharp
    llm = open_llama(export_gguf(model, tokenizer, tmp_path / "s-q8_0.gguf", quant="q8_0"))
    try:  # quantisation noise grows along a random model's continuation: the first 8 tokens, all but one prompt
        same = sum(llama_greedy(llm, prompt_ids(tokenizer, q), 8) == expected[q][:8] for q in PROMPTS)
    finally:
        llm.close()
    assert same >= len(PROMPTS) - 1
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "s-q8_0.gguf")).tensors}
    assert "Q8_0" in types and "F16" not in types

    k = export_gguf(model, tokenizer, tmp_path / "s-q4_k_m.gguf", quant="q4_k_m")
    reader = gguf.GGUFReader(str(k))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert k.stat().st_size < (tmp_path / "s-q8_0.gguf").stat().st_size
    llm = open_llama(k)
    try:
        assert len(llama_greedy(llm, prompt_ids(tokenizer, PROMPTS[0]), 4)) == 4
    finally:
        llm.close()


def test_a_lora_adapter_student_is_merged_into_the_gguf(sharp, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tokenizer, base_greedy = sharp
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(1)
    lora = get_peft_model(sharp_tiny_llama()[0], LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # a trained-sized update (a random full-scale one makes the model chaotic)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    lora.peft_config["default"].base_model_name_or_path = str(base_dir)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    merged, _ = load_model(adapter, device="cpu")

    path = export_student_gguf(adapter, tmp_path / "out", quant="f16", name="lora")
    llm = open_llama(path)
    try:
        for q in PROMPTS[:3]:
            want = hf_greedy(merged, prompt_ids(tokenizer, q), 8)
            assert want != base_greedy[q][:8]  # the adapter changes the answer, so the merge is what is tested
            assert llama_greedy(llm, prompt_ids(tokenizer, q), 8) == want, q
    finally:
        llm.close()


@pytest.fixture
def run_folder(sharp, tmp_path) -> Path:
    """runs/<name>/ as `reasonlite run` leaves it: config.yaml and train/model (a merged PAL student)."""
    model, tokenizer, _ = sharp
    cfg = build_config({"name": "tiny-pal", "runs_dir": str(tmp_path / "runs"),
                        "student": {"model": "tiny-random-llama", "format": "pal"},
                        "budget": {"reasoning_budget": 64}})
    run = tmp_path / "runs" / "tiny-pal"
    export_student(model, tokenizer, cfg, run / "train" / "model")
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


def test_export_command_writes_gguf_modelfile_and_a_serve_yaml_the_llamacpp_backend_serves(sharp, run_folder):
    from slm_fusion.backends.base import GenerationRequest, make_backend
    from slm_fusion.config import load_fusion_config

    model, tokenizer, _ = sharp
    result = CliRunner().invoke(app, ["export", str(run_folder), "--gguf", "--quant", "f16"])
    assert result.exit_code == 0, result.output
    gguf_path = run_folder / "export" / "tiny-pal-f16.gguf"
    assert gguf_path.is_file()
    assert read_student_meta(gguf_path)["format"] == "pal"  # the gateway's reasoning layer reads it beside the GGUF

    modelfile = (run_folder / "export" / "Modelfile").read_text()
    assert "FROM ./tiny-pal-f16.gguf" in modelfile
    assert INSTRUCTIONS["pal"] in modelfile  # the student's own prompt format, asked of the last user turn
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile

    serve = load_fusion_config(run_folder / "serve.yaml")
    entry = next(m for m in serve.models if m.backend == "llamacpp")
    assert entry.name == "tiny-pal-gguf" and Path(entry.model) == gguf_path.resolve()
    assert any(m.backend == "transformers" for m in serve.models)

    messages = build_messages(PROMPTS[1], "pal")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = tokenizer.decode(hf_greedy(model, list(ids), 12), skip_special_tokens=False)

    async def through_the_gateway_backend() -> str:
        backend = make_backend(entry)
        await backend.start()
        try:
            gen = await backend.generate(GenerationRequest(messages=messages, max_tokens=12, temperature=0.0))
            return gen[0].text
        finally:
            await backend.aclose()

    assert asyncio.run(through_the_gateway_backend()) == want


def _fails(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stderr.strip()


def test_export_errors_are_one_line(tmp_path, run_folder):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    code, err = _fails(["export", str(run_folder)])
    assert code == 2 and "--gguf" in err and len(err.splitlines()) == 1
    code, err = _fails(["export", str(tmp_path / "nowhere"), "--gguf"])
    assert code == 3 and "no trained student" in err and len(err.splitlines()) == 1

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    qwen.save_pretrained(tmp_path / "qwen")
    load_tokenizer("tiny-random-llama").save_pretrained(tmp_path / "qwen")
    code, err = _fails(["export", str(tmp_path / "qwen"), "--gguf"])
    assert code == 2 and "Llama students" in err and "Qwen2ForCausalLM" in err and len(err.splitlines()) == 1
    assert not list((tmp_path).glob("qwen-gguf/*.gguf"))


QUESTIONS = [
    "A shop sells 12 apples for $3. How much do 20 apples cost?",
    "Sara has 15 stickers and gives 4 to her friend. How many are left?",
    "What is 7 times 8?",
    "A train travels 60 km in 1 hour. How far does it go in 3 hours?",
    "Tom buys 3 pens at $2 each and a notebook for $5. How much does he spend?",
    "There are 24 students split into 4 equal groups. How many in each group?",
    "A box holds 6 eggs. How many eggs are in 9 boxes?",
    "Lisa reads 10 pages a day. How many pages does she read in a week?",
    "A shirt costs $40 and is 25% off. What is the sale price?",
    "What is 100 minus 37?",
]
TIE = 0.01  # a top-2 logit gap f16 arithmetic can flip (llama.cpp also rounds the activations to f16)


@pytest.mark.integration
def test_real_smollm2_gguf_decodes_as_the_hf_model(tmp_path):
    """SmolLM2-135M-Instruct (the dequantised HF folder), 10 questions, 48 greedy tokens each. f16: the same text on
    at least 9, and any divergence starts at a near-tie of the HF logits. q8_0 (llama.cpp also quantises the
    activations to 8 bits): the first 8 tokens agree on at least 9 of the 10."""
    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu")
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    prompts = [list(tokenizer.apply_chat_template(build_messages(q, "cot"), add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)) for q in QUESTIONS]
    want = [[t for t in hf_greedy(model, ids, 48, eos=eos) if t != eos] for ids in prompts]

    def gap_at_divergence(ids: list[int], hf: list[int], got: list[int]) -> float | None:
        at = next((i for i, (a, b) in enumerate(zip(hf, got)) if a != b), None)
        if at is None:
            return None if len(hf) == len(got) else 0.0
        with torch.no_grad():
            top = torch.topk(model(torch.tensor([ids + hf[:at]])).logits[0, -1], 2).values
        return float(top[0] - top[1])

    report = {}
    for quant in ("f16", "q8_0"):
        llm = open_llama(export_gguf(model, tokenizer, tmp_path / f"smollm2-{quant}.gguf", quant=quant))
        try:
            got = [llama_greedy(llm, ids, 48, eos=eos) for ids in prompts]
        finally:
            llm.close()
        report[quant] = {"same_text": [g == w for g, w in zip(got, want)],
                         "same_first_8": [g[:8] == w[:8] for g, w in zip(got, want)],
                         "gaps": [gap_at_divergence(ids, w, g) for ids, w, g in zip(prompts, want, got)]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert sum(report["f16"]["same_text"]) >= len(QUESTIONS) - 1, report
    assert all(g is None or g < TIE for g in report["f16"]["gaps"]), report
    assert sum(report["q8_0"]["same_first_8"]) >= len(QUESTIONS) - 1, report


def test_serve_yaml_without_an_export_has_only_the_hf_student(run_folder):
    from reasonlite.config import load_config
    from reasonlite.pipeline import write_serve_config

    serve = yaml.safe_load(write_serve_config(run_folder, run_folder / "train" / "model",
                                              load_config(run_folder / "config.yaml")).read_text())
    assert [m["backend"] for m in serve["models"]] == ["transformers"]
