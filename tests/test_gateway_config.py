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
    ("models:\n  - {name: a, backend: transformers, model: x, autoscaling: {min_replicas: 3, max_replicas: 2}}\n",
     "min_replicas (3) exceeds max_replicas (2)"),
    ("models:\n  - {name: a, backend: transformers, model: x, replicas: 2, autoscaling: {max_replicas: 4}}\n",
     "either `replicas` or `autoscaling`"),
    ("models:\n  - {name: a, backend: transformers, model: x, ray_actor_options: {num_gpu: 1}}\n", "num_gpu"),
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


def test_ray_serve_options_come_from_the_model_config():
    from slm_fusion.deploy_ray import deployment_options, replica_count

    fixed, auto = FusionConfig.model_validate({"models": [
        {"name": "a", "backend": "transformers", "model": "x", "replicas": 2, "max_concurrency": 4, "max_queue": 9,
         "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25}},
        {"name": "b", "backend": "llamacpp", "model": "y.gguf",
         "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 1.5}}]}).models
    assert deployment_options(fixed) == {"name": "model-a", "num_replicas": 2, "max_ongoing_requests": 4,
                                         "max_queued_requests": 9,
                                         "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25}}
    options = deployment_options(auto)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 1.5}
    assert (replica_count(fixed), replica_count(auto)) == (2, 3)


def test_cli_address_needs_the_ray_engine(tmp_path):
    out = CliRunner().invoke(app, ["serve", str(write(tmp_path, "models: []\n")), "--address", "auto"])
    assert out.exit_code == 2 and "--address joins a Ray cluster: add --engine ray" in out.output


ROUTING_MODELS = ("models:\n  - {name: small, backend: openai, model: s, base_url: http://127.0.0.1:9/v1}\n"
                  "  - {name: big, backend: openai, model: b, base_url: http://127.0.0.1:9/v1}\n")


@pytest.mark.parametrize("routing, line", [
    ("routers:\n  r: {type: rulez, default: small}\n",
     "routers.r: `type` must name a router class: one of cascade, classifier, fusion, rules, semantic"),
    ("routers:\n  r: {type: rules, default: small, rulez: []}\n", "routers.r.rules.rulez: unknown field"),
    ("virtual_models:\n  auto: {router: cascade, models: [small, big], treshold: 0.5}\n",
     "virtual_models.auto.cascade.treshold: unknown field"),
    ("virtual_models:\n  auto: {router: rules, default: ghost}\n",
     "virtual_models.auto: model 'ghost' is not configured; use one of ['big', 'small'] or add it to `models:`"),
    ("routers:\n  r: {type: rules, default: small}\nvirtual_models:\n  auto: {router: q}\n",
     "virtual_models.auto.router: 'q' is neither a router in `routers:` (['r'])"),
])
def test_check_names_the_bad_routing_field(tmp_path, routing, line):
    """`slm-fusion check` on a bad routing section: exit 2 and one line naming the field path and the fix."""
    out = CliRunner().invoke(app, ["check", str(write(tmp_path, ROUTING_MODELS + routing))])
    assert out.exit_code == 2, out.output
    assert line in " ".join(out.output.split()), out.output  # rich may wrap a long line
    assert "Traceback" not in out.output
