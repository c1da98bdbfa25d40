from pathlib import Path

import pytest
import yaml

from reasonlite.config import (
    STAGE_SECTIONS,
    ConfigError,
    ReasonLiteConfig,
    StageConfigError,
    build_config,
    config_hash,
    get_dotted,
    load_config,
    parse_override,
    stage_hash,
)

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_defaults_are_the_offline_quickstart():
    cfg = ReasonLiteConfig()
    assert cfg.teacher.kind == "dataset"
    assert cfg.student.format == "pal" and cfg.traces.style == "pal"
    assert cfg.data.source == "retail_math"


def test_every_field_is_documented():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, ReasonLiteConfig.__mro__[1]):
                yield from walk(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field.description

    undocumented = [path for path, doc in walk(ReasonLiteConfig) if not doc]
    assert undocumented == [], f"fields without a description: {undocumented}"


def test_validation_error_names_dotted_path_and_fix():
    with pytest.raises(ConfigError) as e:
        build_config({"train": {"learning_rate": -1}})
    assert "train.learning_rate" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config({"traces": {"self_consistency": {"k": 0}}})
    assert "traces.self_consistency.k" in str(e.value)


def test_unknown_field_is_refused_not_ignored():
    with pytest.raises(ConfigError) as e:
        build_config({"train": {"learnig_rate": 1e-3}})
    assert "train.learnig_rate" in str(e.value) and "unknown field" in str(e.value)


def test_inconsistent_style_and_format_says_which_knob():
    with pytest.raises(ConfigError) as e:
        build_config({"traces": {"style": "cot"}, "student": {"format": "pal"}})
    assert "traces.style" in str(e.value)


def test_teacher_openai_requires_base_url():
    with pytest.raises(ConfigError) as e:
        build_config({"teacher": {"kind": "openai", "model": "gpt"}})
    assert "teacher.base_url" in str(e.value)


def test_overrides_and_yaml_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 7}}))
    key, value = parse_override("train.learning_rate=3e-4")
    cfg = load_config(path, {key: value})
    assert cfg.train.max_steps == 7 and cfg.train.learning_rate == pytest.approx(3e-4)
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")


def test_stage_hash_ignores_later_stages():
    a = ReasonLiteConfig()
    b = build_config({"train": {"learning_rate": 5e-4}})
    assert stage_hash(a, "traces") == stage_hash(b, "traces")
    assert stage_hash(a, "train") != stage_hash(b, "train")
    c = build_config({"traces": {"self_consistency": {"k": 4}}})
    assert stage_hash(a, "traces") != stage_hash(c, "traces")
    assert config_hash(a) != config_hash(b)


def test_cli_config_show_and_schema():
    from typer.testing import CliRunner

    from reasonlite.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", "--set", "train.max_steps=9"])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.output)["train"]["max_steps"] == 9
    schema = runner.invoke(app, ["config", "schema"])
    assert schema.exit_code == 0 and '"learning_rate"' in schema.output
    bad = runner.invoke(app, ["config", "show", "--set", "train.max_steps=0"])
    assert bad.exit_code == 2 and "train.max_steps" in bad.output


@pytest.mark.parametrize("name", ["retail_math.yaml", "openai_teacher.yaml", "retail_cot_budget.yaml"])
def test_example_configs_load(name):
    from pathlib import Path

    from reasonlite.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "examples" / name)
    if name == "retail_cot_budget.yaml":
        assert cfg.budget.compress and cfg.budget.condition_training and cfg.eval.calculator


def test_late_knobs_enter_the_hash_only_when_set():
    cot = {"student": {"format": "cot"}, "traces": {"style": "cot"}}
    a = build_config(cot)
    # Recorded from this release: a knob added later (data.program_names, train.packing, ...) left at its default
    # must not change it, or every user's cached stages would be redone. Change the pin only on purpose.
    assert config_hash(a) == "0075ab0043af48ae"
    from reasonlite.config import LATE_KNOBS

    assert {"data.program_names", "train.packing", "eval.select"} <= set(LATE_KNOBS)
    assert config_hash(build_config({**cot, "data": {"program_names": False}})) != config_hash(a)
    b = build_config({**cot, "budget": {"compress": True, "condition_training": True}})
    a_conditioned = build_config({**cot, "budget": {"condition_training": True}})
    assert stage_hash(a_conditioned, "train") != stage_hash(b, "train")
    assert stage_hash(a_conditioned, "traces") == stage_hash(b, "traces")
    c = build_config({**cot, "eval": {"calculator": True}})
    assert stage_hash(a, "train") == stage_hash(c, "train") and stage_hash(a, "eval") != stage_hash(c, "eval")


def test_one_formatter_names_the_field_path_for_every_config():
    """`format_validation_error` serves ReasonLite's and the gateway's configs; `field_path` is the one path helper."""
    from pydantic import ValidationError

    from reasonlite.config import field_path, format_validation_error
    from slm_fusion.config import FusionConfig

    assert field_path(("body", "messages", 0, "role"), skip=("body",)) == "messages.0.role"
    assert field_path(()) == "(root)" and field_path(("body",), skip=("body",), empty="body") == "body"
    with pytest.raises(ValidationError) as e:
        FusionConfig.model_validate({"server": {"acess_log": False, "max_request_bytes": 10}})
    text = format_validation_error(e.value, "gateway.yaml", schema=FusionConfig)
    assert text.splitlines() == [
        "invalid gateway.yaml:",
        "  server.max_request_bytes: Input should be greater than or equal to 1024 (got 10)",
        "  server.acess_log: unknown field; did you mean `access_log`?",
    ]
    with pytest.raises(ValidationError) as e:  # a cross-field check names its own path: shown as written
        FusionConfig.model_validate({"routing": {"fallbacks": {"a": ["b"]}}})
    assert format_validation_error(e.value, schema=FusionConfig).splitlines()[1] == \
        "  routing.fallbacks.a: model 'a' is not configured; use one of []"


def test_the_inference_cap_has_the_gateways_name_and_the_old_one_still_loads(tmp_path, monkeypatch, caplog):
    """`budget.reasoning_budget` (the gateway's `reasoning.reasoning_budget`); `budget.inference_cap` loads with one
    warning line for one release, in a YAML and as an override, and hashes are those recorded before the rename."""
    import logging

    import reasonlite.config as rc
    from reasonlite.tune import base_config_hash

    monkeypatch.setattr(rc, "_warned_renames", set())
    old = tmp_path / "old.yaml"
    old.write_text("budget: {inference_cap: 160}\n")
    with caplog.at_level(logging.WARNING, logger="reasonlite.config"):
        cfg = load_config(old)
        assert load_config(None, {"budget.inference_cap": 160}) == cfg
    assert cfg.budget.reasoning_budget == 160 and "inference_cap" not in cfg.budget.model_dump()
    warned = [r.getMessage() for r in caplog.records if "inference_cap" in r.getMessage()]
    line = "warning: budget.inference_cap is deprecated, rename it budget.reasoning_budget (the old name goes in the next release)"
    assert warned == [line]  # one line, once per process
    assert build_config({"budget": {"reasoning_budget": 160}}) == cfg
    with pytest.raises(ConfigError, match="same knob"):
        build_config({"budget": {"inference_cap": 1, "reasoning_budget": 2}})
    # Recorded with the code before the rename (budget.inference_cap: 160): finished stages and tune studies stay valid.
    assert stage_hash(cfg, "eval") == "3bf438eba99c119b" and stage_hash(cfg, "train") == "c82094676286cb81"
    assert config_hash(cfg) == "18c6261364eff4e4" and base_config_hash(cfg) == "c9d3e49641a19403"


# Recorded with main at f4d6621, before stages read the config through `StageView`: the view must not move one cached
# stage folder. Change a pin only on purpose (it re-runs that stage for every user of the config).
STAGE_HASHES_BEFORE_VIEWS = {
    "retail_math.yaml": {"traces": "3ed1855af88280fe", "train": "c82094676286cb81", "eval": "6fc74bd30794f33f"},
    "gsm8k_pal.yaml": {"traces": "87df46db4a80fbc5", "train": "7ddd266d110bc98f", "eval": "5948f27384055771"},
    "openai_teacher.yaml": {"traces": "a420515f8d1390a2", "train": "dfea2f6ac67637f9", "eval": "41eac8d0530fb7d8"},
    "retail_cot_budget.yaml": {"traces": "97dc4da5ea0cb9b5", "train": "1e75832765586453", "eval": "a518ecb85da1d1f7"},
    "demo defaults": {"traces": "2d15c996d506bd73", "train": "749a91805abc5446", "eval": "d5283b1a03be5b2b"},
}


@pytest.mark.parametrize("name", list(STAGE_HASHES_BEFORE_VIEWS))
def test_stage_hashes_are_those_recorded_before_stage_views(name):
    from reasonlite.pipeline import DEMO_DEFAULTS

    cfg = build_config(DEMO_DEFAULTS) if name == "demo defaults" else load_config(EXAMPLES / name)
    assert {stage: stage_hash(cfg, stage) for stage in STAGE_SECTIONS} == STAGE_HASHES_BEFORE_VIEWS[name]
    assert {stage: cfg.stage_view(stage).hash() for stage in STAGE_SECTIONS} == STAGE_HASHES_BEFORE_VIEWS[name]


def test_a_stage_reads_the_sections_of_its_hash_and_nothing_else():
    cfg = load_config(EXAMPLES / "retail_cot_budget.yaml")
    traces, train, evaluation = (cfg.stage_view(stage) for stage in ("traces", "train", "eval"))
    # its own sections and the earlier stages' (eval reads data; traces reads student.model), whole or in part
    assert evaluation.data is cfg.data and evaluation.train.seed == 0 and evaluation.budget.answer_tokens == 12
    assert traces.student.model == "smollm2-135m-instruct" and traces.budget.data_policy == "drop"
    assert train.budget.compress and train.budget.buckets == [16, 24, 32, 48, 64, 96, 128, 256]
    assert (traces.name, traces.runs_dir) == ("retail-cot-budget", "runs")  # where it writes, in no hash
    with pytest.raises(StageConfigError) as err:
        get_dotted(traces, "budget.reasoning_budget")
    assert str(err.value) == (
        "the traces stage read budget.reasoning_budget, which is not in its hash, so a change to it would reuse a "
        "stale cached traces stage: add 'budget.reasoning_budget' to STAGE_SECTIONS['traces'] in reasonlite/config.py "
        "(a knob already in use also to LATE_KNOBS, so existing hashes stay), or read it in a stage that has it")
    # a section declared in part names the field; a section not declared at all is refused whole
    for view, knob, named in [(traces, "student.format", "student.format"), (train, "eval.calculator", "eval"),
                              (evaluation, "verifier.k", "verifier"), (evaluation, "tune.seed", "tune")]:
        with pytest.raises(StageConfigError, match=rf"^the {view.stage} stage read {named}, .* add '{named}' to "):
            get_dotted(view, knob)
    with pytest.raises(AttributeError, match="budget.bucket is not a config field"):  # a typo stays a typo
        get_dotted(train, "budget.bucket")
    # narrowing to an earlier stage is safe, widening would let a stage read a later stage's knobs
    assert evaluation.stage_view("traces").hash() == traces.hash() and train.stage_view("train") is train
    with pytest.raises(StageConfigError, match="the train stage cannot read as the eval stage"):
        train.stage_view("eval")
    with pytest.raises(ValueError, match="unknown pipeline stage 'export'"):
        cfg.stage_view("export")


@pytest.mark.parametrize("stage", ["train", "eval"])
def test_a_dumped_stage_view_loads_back_with_the_same_stage_hash(tmp_path, stage):
    """torchrun's workers get `view.dump()` (reasonlite.train.distributed), so it must name the same stage folder."""
    for example in ("retail_math.yaml", "gsm8k_pal.yaml", "openai_teacher.yaml", "retail_cot_budget.yaml"):
        view = load_config(EXAMPLES / example, {"tune.seed": 7, "verifier.k": 4}).stage_view(stage)
        path = tmp_path / f"{stage}-{example}"
        path.write_text(view.dump())
        dumped = yaml.safe_load(path.read_text())
        assert "tune" not in dumped and "verifier" not in dumped and ("eval" in dumped) == (stage == "eval")
        assert load_config(path).stage_view(stage).hash() == view.hash() == STAGE_HASHES_BEFORE_VIEWS[example][stage]


def test_the_context_knobs_leave_every_existing_hash_unchanged():
    """traces.context, eval.context_modes, data.heldout_kinds / n_test_heldout_kinds and the `context` section came
    later: at their defaults no cached stage is orphaned. Pinned from the code before they existed (`git show
    HEAD:src/reasonlite/config.py` of commit f4d6621), not recomputed by this code."""
    from pathlib import Path

    from reasonlite.tune import base_config_hash

    root = Path(__file__).parents[1] / "examples"
    pins = {"retail_math.yaml": ("7622fb1ac8de1b84", "3ed1855af88280fe", "c82094676286cb81", "6fc74bd30794f33f"),
            "gsm8k_pal.yaml": ("fdccb8d5f3cf71be", "87df46db4a80fbc5", "7ddd266d110bc98f", "5948f27384055771"),
            "retail_cot_budget.yaml": ("d5eaf34dead0575a", "97dc4da5ea0cb9b5", "1e75832765586453",
                                       "a518ecb85da1d1f7")}
    for name, (whole, traces, train, evaluation) in pins.items():
        cfg = load_config(root / name)
        assert (config_hash(cfg), stage_hash(cfg, "traces"), stage_hash(cfg, "train"), stage_hash(cfg, "eval")) == \
            (whole, traces, train, evaluation), name
    # a tune study's identity (base_config_hash, recomputed with its formula on the old config code)
    assert [base_config_hash(load_config(root / n)) for n in ("retail_math.yaml", "gsm8k_pal.yaml")] == \
        ["e529d91ab821686d", "58f6ed29bc0abaca"]
    assert stage_hash(load_config(root / "retail_math.yaml", {"traces.context": "gold"}), "traces") != \
        "3ed1855af88280fe"


def test_the_transfer_recipe_names_splits_its_data_has():
    from reasonlite.data.splits import load_splits

    cfg = load_config(EXAMPLES / "retail_transfer.yaml", {"data.n_train": 40})
    splits = load_splits(cfg.data)
    assert set(cfg.eval.splits) <= set(splits) and cfg.traces.augment.k == 1 and cfg.data.mix[0].weight == 0
    assert len(splits["gsm8k:test"]) == 100 and len(splits["test_heldout_families"]) == 100
