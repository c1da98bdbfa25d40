"""Every ordinary mistake on either CLI ends with ONE line on stderr naming the field/path, no traceback, and the
documented exit code (2 usage/config, 3 data/model not found, 4 runtime; reasonlite.cli_boundary).

Table-driven and in-process (typer's CliRunner goes through the same `OneLineErrorsGroup.main` as the scripts)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from reasonlite.cli import app as reasonlite_app
from slm_fusion.cli import app as fusion_app

GOOD = {"name": "cli", "student": {"model": "tiny-random-llama", "lora_r": 4},
        "data": {"n_train": 4, "n_test": 2, "n_test_heldout_templates": 1}}
SPACES = {
    "space_field": {"params": {"train.learnin_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}},
    "space_type": {"params": {"train.learning_rate": {"type": "gaussian", "low": 1e-4, "high": 1e-3}}},
    "space_range": {"params": {"train.learning_rate": {"type": "float", "low": 1e-2, "high": 1e-3}}},
    "space_choices": {"params": {"traces.style": {"type": "categorical"}}},
    "space_extra": {"params": {"student.lora_r": {"type": "int", "low": 2, "high": 8, "spread": 1}}},
    "space_trials": {"params": {"student.lora_r": {"type": "int", "low": 2, "high": 8}}, "trials": 0},
    "space_section": {"params": {"trian.max_steps": {"type": "int", "low": 1, "high": 2}}},
}
GATEWAYS = {
    "gw_folder": {"models": [{"name": "a", "backend": "transformers", "model": "./no-such-model"}]},
    "gw_weights": {"models": [{"name": "a", "backend": "transformers", "model": "./weightless"}]},
    "gw_gguf": {"models": [{"name": "a", "backend": "llamacpp", "model": "missing.gguf"}]},
    "gw_dup": {"models": [{"name": "a", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"},
                          {"name": "a", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}]},
    "gw_backend": {"models": [{"name": "a", "backend": "vllm", "model": "m"}]},
    "gw_extra": {"models": [{"name": "a", "backend": "openai", "model": "m", "base_url": "http://x/v1", "colour": 1}]},
    "gw_concurrency": {"models": [{"name": "a", "backend": "openai", "model": "m", "base_url": "http://x/v1",
                                   "max_concurrency": 0}]},
    "gw_server": {"server": {"max_request_bytes": 10}, "models": []},
    "gw_server_key": {"server": {"api_key": "x"}, "models": []},
    "gw_ok": {"models": [{"name": "a", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}]},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "good.yaml").write_text(yaml.safe_dump({**GOOD, "runs_dir": str(d / "runs")}))
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "broken.yaml").write_text("train: [1\n")
    (d / "typo.yaml").write_text(yaml.safe_dump({"train": {"lr": 1e-3}}))
    (d / "badvalue.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 0}}))
    for name, space in SPACES.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(space))
    (d / "space_list.yaml").write_text("- 1\n")
    for name, gw in GATEWAYS.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(gw))
    (d / "gw_list.yaml").write_text("- a\n")
    (d / "gw_broken.yaml").write_text("models: [\n")
    (d / "weightless").mkdir()
    (d / "weightless" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "empty_dir").mkdir()
    return d


R, F = "reasonlite", "slm-fusion"
# (cli, args, exit code, substrings stderr must contain); {d} is the fixture folder
CASES = [
    # --- config fields and values: the dotted path, and a suggestion for a typo
    (R, "config show --set train.lr=1", 2, ["train.lr", "learning_rate"]),
    (R, "config show --set train.learnin_rate=1", 2, ["train.learnin_rate", "learning_rate"]),
    (R, "config show --set student.lora_rank=4", 2, ["student.lora_rank", "lora_r"]),
    (R, "config show --set eval.limt=3", 2, ["eval.limt", "limit"]),
    (R, "config show --set train.batch=3", 2, ["train.batch", "batch_size"]),
    (R, "config show --set trian.max_steps=3", 2, ["trian", "train"]),
    (R, "config show --set train.max_steps=0", 2, ["train.max_steps"]),
    (R, "config show --set train.learning_rate=abc", 2, ["train.learning_rate"]),
    (R, "config show --set train.learning_rate=2", 2, ["train.learning_rate"]),
    (R, "config show --set teacher.kind=gpt", 2, ["teacher.kind"]),
    (R, "config show --set teacher.kind=openai", 2, ["teacher.model"]),
    (R, "config show --set traces.style=cot", 2, ["traces.style"]),
    (R, "config show --set student.format=essay", 2, ["student.format"]),
    (R, "config show --set budget.buckets=[64,32]", 2, ["budget.buckets"]),
    (R, "config show --set data.on_bad_rows=maybe", 2, ["data.on_bad_rows"]),
    (R, "config show --set eval.n=0", 2, ["eval.n"]),
    (R, "config show --set tune.sampler=grid", 2, ["tune.sampler"]),
    (R, "config show --set tune.pick=best", 2, ["tune.pick"]),
    (R, "config show --set noequals", 2, ["noequals"]),
    (R, "config show --set train.max_steps.x=1", 2, ["train.max_steps"]),
    (R, "config show {d}/missing.yaml", 2, ["missing.yaml"]),
    (R, "config show {d}/list.yaml", 2, ["list.yaml"]),
    (R, "config show {d}/broken.yaml", 2, ["broken.yaml"]),
    (R, "config show {d}/typo.yaml", 2, ["train.lr", "learning_rate"]),
    (R, "config show {d}/badvalue.yaml", 2, ["train.max_steps"]),
    (R, "config schema extra", 2, ["extra"]),
    # --- options: ranges and choices
    (R, "run --force typo", 2, ["--force", "traces"]),
    (R, "run {d}/missing.yaml", 2, ["missing.yaml"]),
    (R, "run {d}/good.yaml --set train.lr=1", 2, ["train.lr"]),
    (R, "tune --space {d}/space_field.yaml --trials -1", 2, ["--trials"]),
    (R, "tune --space {d}/space_field.yaml --pick bogus", 2, ["--pick", "knee"]),
    (R, "tune {d}/good.yaml --space {d}/space_trials.yaml --storage foo://bar", 2, ["foo://bar", "sqlite"]),
    (R, "tune {d}/good.yaml --space {d}/space_trials.yaml --storage notaurl", 2, ["notaurl"]),
    (R, "tune", 2, ["--space"]),
    (R, "tune {d}/good.yaml --space {d}/missing.yaml", 2, ["missing.yaml"]),
    (R, "tune {d}/good.yaml --space {d}/space_field.yaml", 2, ["train.learnin_rate", "learning_rate"]),
    (R, "tune {d}/good.yaml --space {d}/space_section.yaml", 2, ["trian.max_steps"]),
    (R, "tune {d}/good.yaml --space {d}/space_type.yaml", 2, ["type"]),
    (R, "tune {d}/good.yaml --space {d}/space_range.yaml", 2, ["low <= high"]),
    (R, "tune {d}/good.yaml --space {d}/space_choices.yaml", 2, ["traces.style", "choices"]),
    (R, "tune {d}/good.yaml --space {d}/space_extra.yaml", 2, ["spread"]),
    (R, "tune {d}/good.yaml --space {d}/space_trials.yaml --trials 1", 2, ["trials"]),
    (R, "tune {d}/good.yaml --space {d}/space_list.yaml", 2, ["space_list.yaml"]),
    (R, "tune --space {d}/space_trials.yaml --trials abc", 2, ["--trials"]),
    (R, "eval foo --limit 0", 2, ["--limit"]),
    (R, "eval foo --n 0", 2, ["--n"]),
    (R, "eval foo --n 1000", 2, ["--n"]),
    (R, "eval tiny-random-llama --budgets abc", 2, ["--budgets"]),
    (R, "eval {d}/good.yaml", 3, ["no exported model"]),
    (R, "eval tiny-random-llama --data {d}/missing.jsonl --limit 1", 3, ["missing.jsonl"]),
    (R, "eval tiny-random-llama --set eval.limt=1", 2, ["eval.limt", "limit"]),
    (R, "compare {d}/empty_dir", 3, ["empty_dir"]),
    (R, "train --resume --fresh", 2, ["--fresh"]),
    (R, "train {d}/good.yaml --traces {d}/empty_dir", 3, ["no trace set", "empty_dir"]),
    (R, "train {d}/good.yaml --traces {d}/empty_dir --adapter-only --set student.lora=false", 2, ["--adapter-only"]),
    (R, "train --set train.lr=1", 2, ["train.lr", "learning_rate"]),
    (R, "traces {d}/missing.yaml", 2, ["missing.yaml"]),
    (R, "traces --set traces.self_consistency.k=0", 2, ["traces.self_consistency.k"]),
    (R, "demo --set train.lr=1", 2, ["train.lr"]),
    (R, "bogus-command", 2, ["bogus-command"]),
    (R, "train --bogus", 2, ["--bogus"]),
    # --- slm-fusion
    (F, "serve {d}/gw_ok.yaml --port 70000", 2, ["--port"]),
    (F, "serve {d}/gw_ok.yaml --port 0", 2, ["--port"]),
    (F, "serve {d}/gw_ok.yaml --port http", 2, ["--port"]),
    (F, "serve {d}/gw_ok.yaml --log-level loud", 2, ["--log-level"]),
    (F, "serve {d}/gw_ok.yaml --keep-alive 0", 2, ["--keep-alive"]),
    (F, "serve {d}/gw_ok.yaml --graceful-timeout -1", 2, ["--graceful-timeout"]),
    (F, "serve {d}/missing.yaml", 2, ["missing.yaml"]),
    (F, "serve {d}/gw_folder.yaml", 3, ["models[0].model", "no-such-model"]),
    (F, "check", 2, ["config"]),
    (F, "check {d}/missing.yaml", 2, ["missing.yaml"]),
    (F, "check {d}/gw_broken.yaml", 2, ["gw_broken.yaml"]),
    (F, "check {d}/gw_list.yaml", 2, ["gw_list.yaml"]),
    (F, "check {d}/gw_dup.yaml", 2, ["duplicate"]),
    (F, "check {d}/gw_backend.yaml", 2, ["models.0"]),
    (F, "check {d}/gw_extra.yaml", 2, ["colour"]),
    (F, "check {d}/gw_concurrency.yaml", 2, ["max_concurrency"]),
    (F, "check {d}/gw_server.yaml", 2, ["server.max_request_bytes"]),
    (F, "check {d}/gw_server_key.yaml", 2, ["server.api_key"]),
    (F, "check {d}/gw_folder.yaml", 3, ["models[0].model", "no-such-model"]),
    (F, "check {d}/gw_weights.yaml", 3, ["weightless", "weight files"]),
    (F, "check {d}/gw_gguf.yaml", 3, ["missing.gguf"]),
    (F, "bogus-command", 2, ["bogus-command"]),
]


def _invoke(cli: str, args: list[str]):
    return CliRunner().invoke(reasonlite_app if cli == R else fusion_app, args, prog_name=cli)


def _assert_one_line(result, code: int, needles: list[str]) -> None:
    err = result.stderr.strip()
    assert result.exit_code == code, (result.exit_code, result.stdout[-2000:], err)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize(("cli", "args", "code", "needles"), CASES,
                         ids=[f"{c[0]}:{c[1].replace('{d}/', '')}" for c in CASES])
def test_bad_input_is_one_line_with_exit_code(files, monkeypatch, cli, args, code, needles):
    monkeypatch.chdir(files)
    _assert_one_line(_invoke(cli, args.format(d=files).split()), code, needles)


def test_enough_cases():
    assert len(CASES) >= 60


def test_port_in_use_is_found_before_any_model_loads(files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = _invoke(F, ["serve", str(files / "gw_ok.yaml"), "--port", str(port)])
    _assert_one_line(result, 4, ["--port", str(port)])


def test_library_deprecation_notices_are_quiet_unless_debug(monkeypatch):
    import os
    import warnings

    from reasonlite.cli_boundary import quiet_library_warnings

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use x.", FutureWarning)
        warnings.warn("our own FutureWarning stays", FutureWarning)
    assert [str(w.message) for w in seen] == ["our own FutureWarning stays"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # no tqdm bars under our rich progress


def test_debug_shows_the_traceback(files):
    result = _invoke(R, ["--debug", "config", "show", "--set", "train.lr=1"])
    assert result.exit_code != 0 and result.exception is not None
    assert "train.lr" in str(result.exception)


@pytest.mark.parametrize("cli", [R, F])
def test_version(cli):
    result = _invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith(cli + " ")


def test_help_lists_the_choices():
    assert "knee" in _invoke(R, ["tune", "--help"]).stdout
    assert "traces" in _invoke(R, ["run", "--help"]).stdout
    assert "warning" in _invoke(F, ["serve", "--help"]).stdout


def test_gateway_paths_are_relative_to_the_yaml(tmp_path, monkeypatch):
    from slm_fusion.config import load_fusion_config

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "conf" / "verifier").mkdir()
    (tmp_path / "conf" / "gw.yaml").write_text(yaml.safe_dump({
        "models": [{"name": "a", "backend": "llamacpp", "model": "m.gguf"},
                   {"name": "b", "backend": "transformers", "model": "tiny-random-llama",
                    "reasoning": {"select": "verifier", "verifier_path": "verifier"}}],
        "virtual_models": {"learned": {"router": "classifier", "path": "router.pkl"},
                           "s": {"router": "semantic", "default": "a", "exemplars_file": "ex.jsonl"}}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_fusion_config("conf/gw.yaml")
    conf = (tmp_path / "conf").resolve()
    assert cfg.models[0].model == str(conf / "m.gguf")
    assert cfg.models[1].model == "tiny-random-llama"  # aliases untouched
    assert cfg.models[1].reasoning.verifier_path == str(conf / "verifier")
    assert cfg.virtual_models["learned"].path == str(conf / "router.pkl")
    assert cfg.virtual_models["s"].exemplars_file == str(conf / "ex.jsonl")


def test_merge_lora_refuses_a_full_model(files, tmp_path):
    result = _invoke(F, ["merge-lora", str(files / "weightless"), "--out", str(tmp_path / "out")])
    _assert_one_line(result, 2, ["not a LoRA adapter", "weightless"])
    assert not (tmp_path / "out").exists()
