"""FusionConfig validation and the `slm-fusion check` command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from slm_fusion.cli import app
from slm_fusion.config import ConfigError, FusionConfig, LlamaCppModel, OpenAIModel, load_fusion_config

EXAMPLE = Path(__file__).parent.parent / "examples" / "fusion.yaml"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "fusion.yaml"
    p.write_text(text)
    return p


def test_example_config_loads():
    cfg = load_fusion_config(EXAMPLE)
    assert [m.backend for m in cfg.models] == ["transformers", "llamacpp"]
    assert isinstance(cfg.models[1], LlamaCppModel) and cfg.models[1].slots == 4
    assert cfg.embeddings.name == "all-minilm-l6-v2"


def test_backend_options_are_typed_per_backend():
    cfg = FusionConfig.model_validate({"models": [
        {"name": "u", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1", "timeout_s": 3}]})
    assert isinstance(cfg.models[0], OpenAIModel) and cfg.models[0].timeout_s == 3


@pytest.mark.parametrize("text, needle", [
    ("models:\n  - {name: a, backend: vllm, model: x}\n", "backend"),
    ("models:\n  - {name: a, backend: transformers, model: x, max_batchsize: 4}\n", "max_batchsize"),
    ("models:\n  - {name: a, backend: transformers, model: x}\n  - {name: a, backend: transformers, model: y}\n",
     "duplicate name 'a'"),
    ("models:\n  - {name: a, backend: openai, model: x}\n", "base_url"),
    ("server: {max_request_bytes: 10}\n", "max_request_bytes"),
    ("- just a list\n", "top level must be a mapping"),
])
def test_bad_configs_name_the_field(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_fusion_config(write(tmp_path, text))
    assert needle in str(e.value)


def test_cli_check(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    assert "smollm2" in ok.output and "config OK" in ok.output
    bad = runner.invoke(app, ["check", str(write(tmp_path, "models: [{name: a}]\n"))])
    assert bad.exit_code == 2 and "models.0" in bad.output
