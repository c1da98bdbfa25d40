"""Streaming merge driver, merge config and LoRA folding on tiny random Llama checkpoints written to tmp_path."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slm_fusion.merging import (
    MERGE_METHODS,
    MergeConfig,
    MergeConfigError,
    MergeError,
    combine_adapters,
    load_merge_config,
    merge_adapter,
    run_merge,
)
from slm_fusion.merging.lora import AdapterCheckpoint, lora_scale

torch.set_num_threads(1)
VOCAB = 128


def save_tokenizer(folder, prefix="tok"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"{prefix}{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)


def make_llama(folder, seed, tokenizer_prefix="tok", **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, tokenizer_prefix)
    return folder


def weights(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    return {
        "a": make_llama(root / "a", seed=1),
        "b": make_llama(root / "b", seed=2),
        "base": make_llama(root / "base", seed=3),
    }


def config(method, models, base=None, **extra):
    return MergeConfig(merge_method=method, base_model=str(base) if base else None, models=models, **extra)


def test_linear_half_half_is_the_hand_average_and_loads_and_generates(llamas, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    cfg = config("linear", [{"model": str(llamas["a"]), "parameters": {"weight": 0.5}},
                            {"model": str(llamas["b"]), "parameters": {"weight": 0.5}}])
    report = run_merge(cfg, out, show_progress=False)

    a, b, merged = weights(llamas["a"]), weights(llamas["b"]), weights(out)
    assert set(merged) == set(a) and "lm_head.weight" not in merged  # tied head stays tied
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, atol=1e-6, rtol=0)

    model = AutoModelForCausalLM.from_pretrained(out)
    generated = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("tok9") == 9
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    card = (out / "README.md").read_text()
    assert "linear" in card and str(llamas["a"]) in card

    # memory: the driver holds one tensor per input plus the output, never the model
    assert report.n_tensors == len(a)
    assert report.total_bytes == sum(t.nbytes for t in a.values())
    assert report.peak_tensor_bytes <= (2 + 2) * report.largest_tensor_bytes
    assert report.peak_tensor_bytes < report.total_bytes / 2


def test_small_shards_write_an_index_that_transformers_loads(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    cfg = config("linear", [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}], max_shard_size="100KB")
    report = run_merge(cfg, out, show_progress=False)
    assert len(report.shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report.shards)
    for shard in report.shards:
        assert (out / shard).stat().st_size <= 100 * 1024 + 64 * 1024  # data <= limit unless one tensor is larger
    model = AutoModelForCausalLM.from_pretrained(out)
    a, b = weights(llamas["a"]), weights(llamas["b"])
    torch.testing.assert_close(model.model.norm.weight.data, (a["model.norm.weight"] + b["model.norm.weight"]) / 2)


def test_gradients_and_filters_reach_each_tensor(llamas, tmp_path):
    out = tmp_path / "ta"
    # weight ramps 0 -> 1 across the 2 layers: layer 0 stays the base, layer 1 becomes model a; attention only
    ramp = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.0}]
    cfg = config("task_arithmetic", [{"model": str(llamas["a"]), "parameters": {"weight": ramp}}], base=llamas["base"])
    run_merge(cfg, out, show_progress=False)
    a, base, merged = weights(llamas["a"]), weights(llamas["base"]), weights(out)
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q0], base[q0])
    torch.testing.assert_close(merged[q1], a[q1], atol=1e-6, rtol=0)
    mlp1 = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[mlp1], base[mlp1])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic"])
def test_base_methods_through_the_driver_match_the_tensor_function(llamas, tmp_path, method):
    params = {"weight": 0.7, "density": 0.5} if "density" in MERGE_METHODS[method].model_params else {"weight": 0.7}
    cfg = config(method, [{"model": str(llamas["a"]), "parameters": params},
                          {"model": str(llamas["b"]), "parameters": params}], base=llamas["base"], seed=11)
    run_merge(cfg, tmp_path / method, show_progress=False)
    name = "model.layers.1.mlp.down_proj.weight"
    a, b, base = (weights(llamas[k])[name] for k in ("a", "b", "base"))
    extra = {"density": [0.5, 0.5]} if "density" in params else {}
    expected = MERGE_METHODS[method]([a, b], base, [0.7, 0.7], extra, name=name, generator_seed=11)
    torch.testing.assert_close(weights(tmp_path / method)[name], expected)


def test_merging_a_model_with_itself_returns_it(llamas, tmp_path):
    a = weights(llamas["a"])
    for method in ("linear", "ties", "slerp"):
        base = llamas["a"] if MERGE_METHODS[method].needs_base else None
        run_merge(config(method, [{"model": str(llamas["a"])}] * 2, base=base), tmp_path / method, show_progress=False)
        merged = weights(tmp_path / method)
        for name in a:
            torch.testing.assert_close(merged[name], a[name], atol=1e-6, rtol=0)


def test_output_dtype(llamas, tmp_path):
    cfg = config("slerp", [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}], dtype="bfloat16",
                 parameters={"t": 0.3})
    run_merge(cfg, tmp_path / "bf16", show_progress=False)
    merged = weights(tmp_path / "bf16")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_untied_and_tied_models_merge_their_heads(llamas, tmp_path):
    untied = make_llama(tmp_path / "untied", seed=5, tie_word_embeddings=False)
    cfg = config("linear", [{"model": str(untied)}, {"model": str(llamas["a"])}])
    run_merge(cfg, tmp_path / "out", show_progress=False)
    u, a, merged = weights(untied), weights(llamas["a"]), weights(tmp_path / "out")
    # model a ties its head to its embeddings, so its head is read from the embedding matrix
    torch.testing.assert_close(merged["lm_head.weight"], (u["lm_head.weight"] + a["model.embed_tokens.weight"]) / 2)


def test_mismatches_are_refused_naming_tensor_model_and_fix(llamas, tmp_path):
    wide = make_llama(tmp_path / "wide", seed=4, intermediate_size=96)
    with pytest.raises(MergeError, match=r"shape mismatch for tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight'"):
        run_merge(config("linear", [{"model": str(llamas["a"])}, {"model": str(wide)}]), tmp_path / "x",
                  show_progress=False)
    deep = make_llama(tmp_path / "deep", seed=4, num_hidden_layers=3)
    with pytest.raises(MergeError, match=r"has no tensor 'model\.layers\.2\..*same base"):
        run_merge(config("linear", [{"model": str(deep)}, {"model": str(llamas["a"])}]), tmp_path / "x",
                  show_progress=False)
    other_tok = make_llama(tmp_path / "other_tok", seed=4, tokenizer_prefix="word")
    with pytest.raises(MergeError, match="tokenizer mismatch: models\\[1\\]"):
        run_merge(config("linear", [{"model": str(llamas["a"])}, {"model": str(other_tok)}]), tmp_path / "x",
                  show_progress=False)
    mistral = tmp_path / "mistral"
    shutil.copytree(llamas["b"], mistral)
    cfg_json = json.loads((mistral / "config.json").read_text())
    cfg_json.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(MergeError, match="architecture mismatch"):
        run_merge(config("linear", [{"model": str(llamas["a"])}, {"model": str(mistral)}]), tmp_path / "x",
                  show_progress=False)
    assert not (tmp_path / "x" / "model.safetensors").exists()  # refused before writing


def test_config_validation_names_the_field(tmp_path):
    def bad(data, pattern):
        path = tmp_path / "merge.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(MergeConfigError, match=pattern):
            load_merge_config(path)

    bad({"merge_method": "ties", "models": [{"model": "a"}]}, "needs `base_model`")
    bad({"merge_method": "average", "models": [{"model": "a"}]}, "merge_method: .*unknown merge_method 'average'")
    bad({"merge_method": "slerp", "models": [{"model": "a"}]}, "exactly 2 models")
    bad({"merge_method": "linear", "models": [{"model": "a", "parameters": {"density": 0.5}}]},
        r"models\[0\]\.parameters: \['density'\] not per-model for 'linear'")
    bad({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": [0.5, 1.5]}}]},
        "density=1.5: must be in")
    bad({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float8"}, "dtype")
    bad({"merge_method": "linear", "models": []}, "models")
    bad({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "tokenizer_source": 2},
        "tokenizer_source=2: only 2 models")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": 0.5, "density": [0.3, 0.7]}}],
        "parameters": {"normalize": True, "lambda": 1.0, "density": 0.9},
    }))
    cfg = load_merge_config(good)
    assert cfg.model_parameters(0) == {"weight": 0.5, "density": [0.3, 0.7]}
    assert cfg.global_parameters() == {"normalize": True, "lambda": 1.0}
    good.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}],
                                    "tokenizer_source": 1}))  # a YAML int names a model by index
    assert load_merge_config(good).tokenizer_source == "1"


def test_example_config_validates():
    from pathlib import Path

    cfg = load_merge_config(Path(__file__).parent.parent / "examples" / "merge.yaml")
    assert len(cfg.models) == 2


# ---------------------------------------------------------------------------------------------------------------------
# LoRA


def write_adapter(folder, tensors, **config):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return folder


def test_lora_delta_by_hand_on_a_tiny_linear(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "toy"}))
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # (out=3, in=2)
    save_file({"proj.weight": W, "other.weight": torch.ones(2)}, base / "model.safetensors")
    A = torch.tensor([[1.0, 2.0]])  # (r=1, in)
    B = torch.tensor([[1.0], [0.0], [-1.0]])  # (out, r)
    adapter = write_adapter(tmp_path / "ad", {"base_model.model.proj.lora_A.weight": A,
                                              "base_model.model.proj.lora_B.weight": B},
                            r=1, lora_alpha=2, base_model_name_or_path=str(base))
    # scale = alpha / r = 2; B @ A = [[1, 2], [0, 0], [-1, -2]]
    expected = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, -2.0]])
    torch.testing.assert_close(AdapterCheckpoint(adapter).get("proj.weight"), expected)
    report = merge_adapter(adapter, tmp_path / "merged", show_progress=False)
    merged = weights(tmp_path / "merged")
    torch.testing.assert_close(merged["proj.weight"], expected)
    torch.testing.assert_close(merged["other.weight"], torch.ones(2))
    assert report.n_tensors == 2

    # rsLoRA: alpha / sqrt(r); fan_in_fan_out: the base stores W transposed (in, out), so the delta is transposed
    assert lora_scale(8, 4, use_rslora=True) == 4.0 and lora_scale(8, 4) == 2.0
    save_file({"proj.weight": W.T.contiguous(), "other.weight": torch.ones(2)}, base / "model.safetensors")
    fan = write_adapter(tmp_path / "fan", {"base_model.model.proj.lora_A.weight": A,
                                           "base_model.model.proj.lora_B.weight": B},
                        r=1, lora_alpha=2, use_rslora=True, fan_in_fan_out=True, base_model_name_or_path=str(base))
    torch.testing.assert_close(AdapterCheckpoint(fan).get("proj.weight"), W.T + 2.0 * (B @ A).T)


@pytest.fixture(scope="module")
def peft_setup(llamas, tmp_path_factory):
    """Two real PEFT LoRA adapters (random non-zero B) on the tiny base, saved with their base's folder path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    adapters = []
    for seed, rslora in ((7, False), (8, True)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(llamas["base"])
        lora = LoraConfig(r=4 if seed == 7 else 2, lora_alpha=8, init_lora_weights=False, use_rslora=rslora,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        peft_model = get_peft_model(model, lora)
        peft_model.peft_config["default"].base_model_name_or_path = str(llamas["base"])
        peft_model.save_pretrained(root / f"adapter{seed}")
        adapters.append(root / f"adapter{seed}")
    return adapters


def peft_merged_state(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().state_dict()


def test_streaming_lora_merge_equals_peft_merge_and_unload(llamas, peft_setup, tmp_path):
    for adapter in peft_setup:
        merge_adapter(adapter, tmp_path / adapter.name, show_progress=False)
        ours = weights(tmp_path / adapter.name)
        reference = peft_merged_state(llamas["base"], adapter)
        base = weights(llamas["base"])
        changed = 0
        for name, tensor in ours.items():
            torch.testing.assert_close(tensor, reference[name], atol=1e-5, rtol=0)
            changed += not torch.equal(tensor, base[name])
        assert changed == 2 * 7  # every targeted projection in both layers moved


def test_combined_adapters_linear_model_and_concat_adapter_agree_with_peft(llamas, peft_setup, tmp_path):
    w = [0.7, -0.4]
    combine_adapters(peft_setup, tmp_path / "linear", weights=w, show_progress=False)
    linear = weights(tmp_path / "linear")
    base = weights(llamas["base"])
    deltas = [{k: v - base[k] for k, v in peft_merged_state(llamas["base"], a).items() if k in base}
              for a in peft_setup]
    name = "model.layers.0.self_attn.v_proj.weight"
    torch.testing.assert_close(linear[name], base[name] + w[0] * deltas[0][name] + w[1] * deltas[1][name],
                               atol=1e-5, rtol=0)

    # the concatenated adapter (rank 4 + 2) is exact: peft loading it and merging gives the same weights
    combine_adapters(peft_setup, tmp_path / "cat", weights=w, output="adapter")
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["r"] == 6
    via_peft = peft_merged_state(llamas["base"], tmp_path / "cat")
    for key, tensor in linear.items():
        torch.testing.assert_close(via_peft[key], tensor, atol=1e-5, rtol=0)

    combine_adapters(peft_setup, tmp_path / "ties", weights=[1.0, 1.0], method="ties", density=0.5,
                     show_progress=False)
    ties = weights(tmp_path / "ties")
    expected = MERGE_METHODS["ties"]([base[name] + deltas[0][name], base[name] + deltas[1][name]], base[name],
                                     [1.0, 1.0], {"density": [0.5, 0.5]}, name=name)
    torch.testing.assert_close(ties[name], expected, atol=1e-5, rtol=0)
    with pytest.raises(MergeError, match="no exact low-rank form"):
        combine_adapters(peft_setup, tmp_path / "bad", method="ties", output="adapter")


def test_adapter_can_be_a_model_in_a_merge_config(llamas, peft_setup, tmp_path):
    """mergekit's BASE+ADAPTER reference: the adapted model streams like any checkpoint."""
    ref = f"{llamas['base']}+{peft_setup[0]}"
    cfg = config("linear", [{"model": ref}, {"model": str(llamas["base"])}])
    run_merge(cfg, tmp_path / "half", show_progress=False)
    half = weights(tmp_path / "half")
    reference = peft_merged_state(llamas["base"], peft_setup[0])
    base = weights(llamas["base"])
    name = "model.layers.1.mlp.gate_proj.weight"
    torch.testing.assert_close(half[name], (reference[name] + base[name]) / 2, atol=1e-5, rtol=0)
    with safe_open(tmp_path / "half" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_cli_merge_and_merge_lora(llamas, peft_setup, tmp_path):
    from typer.testing import CliRunner

    from slm_fusion.cli import app

    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(llamas["a"])},
                                                                      {"model": str(llamas["b"])}]}))
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in weights(tmp_path / "out").values()} == {torch.float16}
    result = runner.invoke(app, ["merge-lora", str(peft_setup[0]), "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lora" / "model.safetensors").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "models": [{"model": str(llamas["a"])}]}))
    result = runner.invoke(app, ["merge", str(bad), str(tmp_path / "x")])
    assert result.exit_code == 2 and "base_model" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_refuses_to_overwrite_an_input(llamas, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(llamas["a"], copy)
    with pytest.raises(MergeError, match="write the merge to a new folder"):
        run_merge(config("linear", [{"model": str(copy)}, {"model": str(llamas["b"])}]), copy, show_progress=False)
    assert (copy / "model.safetensors").exists()
