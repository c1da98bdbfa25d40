"""Student training (reasonlite.train) on tiny-random-llama: masks, weighted loss, budget prompts, bad input,
resume == straight run, contrastive stage, export + reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reasonlite.config import build_config
from reasonlite.data.retail_math import generate_retail_math
from reasonlite.formats import build_messages, build_target
from reasonlite.traces import Pair, Trace
from reasonlite.train import TrainError, train_student
from reasonlite.train.formats_data import (
    build_dataset,
    load_trace_set,
    prompt_ids,
    tokenize_example,
    trace_examples,
)

TINY = "tiny-random-llama"


def write_trace_set(folder: Path, n: int = 8, style: str = "pal", programs: bool = True, seed: int = 0) -> Path:
    """A trace-set folder from retail-math gold programs/rationales (the dataset teacher's output, written directly)."""
    folder.mkdir(parents=True, exist_ok=True)
    traces, pairs = [], []
    for e in generate_retail_math(n, seed=seed):
        reasoning = e.program if style == "pal" else e.rationale
        traces.append(Trace(id=f"{e.id}#0", example_id=e.id, question=e.question, gold=e.answer, label=e.answer,
                            domain=e.domain, style=style, text=reasoning, status="correct", answer=e.answer,
                            rationale=None if style == "pal" else e.rationale,
                            program=e.program if (style == "pal" and programs) else None))
        if style == "pal":
            rejected = e.program.replace("return answer", "return answer + 1")
        else:
            rejected = e.rationale.rsplit("The answer is", 1)[0] + "The answer is 0."
        pairs.append(Pair(example_id=e.id, question=e.question, style=style, chosen=reasoning, rejected=rejected,
                          chosen_answer=e.answer, rejected_answer="0", counterfactual=True))
    (folder / "traces.jsonl").write_text("".join(t.model_dump_json() + "\n" for t in traces))
    (folder / "pairs.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    (folder / "manifest.json").write_text(json.dumps({"counts": {"selected": len(traces)}}))
    return folder


def tiny_cfg(**sections):
    base = {"student": {"model": TINY, "lora_r": 4, "lora_alpha": 8},
            "train": {"max_steps": 2, "batch_size": 2, "save_steps": 50, "max_length": 384, "learning_rate": 1e-2}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    if base["student"].get("format") in ("cot", "step_by_step", "answer"):
        base.setdefault("traces", {})["style"] = "cot"
    return build_config(base).stage_view("train")  # what the train stage's code is handed


@pytest.fixture(scope="module")
def tokenizer():
    from reasonlite.models import load_tokenizer

    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def pal_set(tmp_path_factory) -> Path:
    return write_trace_set(tmp_path_factory.mktemp("pal"), n=8, style="pal")


@pytest.fixture(scope="module")
def cot_set(tmp_path_factory) -> Path:
    return write_trace_set(tmp_path_factory.mktemp("cot"), n=8, style="cot")


# ------------------------------------------------------------------------------------------------ formats / masks
@pytest.mark.parametrize("fmt", ["answer", "cot", "pal", "step_by_step"])
def test_labels_mask_exactly_the_prompt(fmt, tokenizer, pal_set, cot_set):
    cfg = tiny_cfg(student={"format": fmt})
    traces = load_trace_set(pal_set if fmt == "pal" else cot_set).traces
    examples, report = trace_examples(cfg, traces, tokenizer)
    assert report.used == len(traces)
    assert len(examples) == len(traces) * (2 if fmt == "step_by_step" else 1)
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    for ex in examples:
        row = tokenize_example(tokenizer, ex)
        p = prompt_ids(tokenizer, ex.messages)
        ids, labels = row["input_ids"], row["labels"]
        assert ids[: len(p)] == p  # the exact inference prompt
        assert labels[: len(p)] == [-100] * len(p)
        assert labels[len(p):] == ids[len(p):] and all(x != -100 for x in labels[len(p):])
        assert ids[-1] == eot  # completion ends with the end-of-turn token the engine stops at
        assert tokenizer.decode(ids[len(p):-1]) == ex.target
    trace = traces[0]
    if fmt == "pal":
        assert examples[0].target == trace.program.strip()
    if fmt == "answer":
        assert examples[0].target == f"The answer is {trace.label}."
    if fmt == "cot":
        assert examples[0].target.endswith(f"The answer is {trace.label}.")
    if fmt == "step_by_step":
        label_row, rationale_row = examples[0], examples[1]
        assert (label_row.task, label_row.loss_weight) == ("label", cfg.train.step_by_step_alpha)
        assert (rationale_row.task, rationale_row.loss_weight) == ("rationale", 1 - cfg.train.step_by_step_alpha)
        assert label_row.messages == build_messages(trace.question, "step_by_step", task="label")
        assert rationale_row.target == build_target("step_by_step", answer=trace.label, rationale=trace.rationale,
                                                    task="rationale")
        ds = build_dataset(cfg, examples, tokenizer)
        assert ds["loss_weight"][:2] == [0.5, 0.5]


def test_budget_prompt_states_the_traces_own_bucket(tokenizer, pal_set):
    traces = load_trace_set(pal_set).traces
    plain, _ = trace_examples(tiny_cfg(), traces, tokenizer)
    assert all("Use at most" not in ex.messages[-1]["content"] for ex in plain)
    cfg = tiny_cfg(budget={"condition_training": True, "buckets": [64, 96, 128, 256]})
    conditioned, _ = trace_examples(cfg, traces, tokenizer)
    seen = set()
    for ex, trace in zip(conditioned, traces):
        n = len(tokenizer(trace.program.strip(), add_special_tokens=False)["input_ids"])
        bucket = next(b for b in [64, 96, 128, 256] if n <= b)
        assert ex.messages == build_messages(trace.question, "pal", budget=bucket)
        assert ex.messages[-1]["content"].endswith(f"Use at most {bucket} tokens.")
        seen.add(bucket)
    # a trace's stored token count (set by the traces stage) wins over recounting
    stored = [t.model_copy(update={"tokens": 30}) for t in traces[:1]]
    ex, _ = trace_examples(cfg, stored, tokenizer)
    assert ex[0].messages[-1]["content"].endswith("Use at most 64 tokens.")


# ------------------------------------------------------------------------------------------------ weighted loss
def _hand_loss(logits, labels, weights):
    """(2/B) * sum_i w_i * mean over completion tokens of -log p(label), computed token by token."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    total = 0.0
    for i in range(labels.size(0)):
        ces = [-logp[i, t - 1, labels[i, t]].item() for t in range(1, labels.size(1)) if labels[i, t] != -100]
        total += float(weights[i]) * sum(ces) / len(ces)
    return 2.0 * total / labels.size(0)


def test_step_by_step_alpha_weights_the_loss_as_computed_by_hand(tokenizer, cot_set):
    from reasonlite.models import load_model
    from reasonlite.train.sft import WeightedCollator, WeightedSFTTrainer

    model, _ = load_model(TINY, device="cpu")
    traces = load_trace_set(cot_set).traces[:2]
    losses = {}
    for alpha in (0.2, 0.8):
        cfg = tiny_cfg(student={"format": "step_by_step"}, train={"step_by_step_alpha": alpha})
        examples, _ = trace_examples(cfg, traces, tokenizer)
        ds = build_dataset(cfg, examples, tokenizer)
        from trl import SFTConfig

        args = SFTConfig(output_dir="/tmp/unused", report_to=[], use_cpu=True, bf16=False, max_length=384,
                         remove_unused_columns=False, gradient_checkpointing=False, disable_tqdm=True)
        trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                                     data_collator=WeightedCollator(pad_token_id=tokenizer.pad_token_id),
                                     weighted=True)
        batch = trainer.data_collator([ds[i] for i in range(len(ds))])
        assert batch["loss_weight"].tolist() == pytest.approx([alpha, 1 - alpha] * 2)
        model.eval()
        with torch.no_grad():
            got = trainer.compute_loss(model, dict(batch)).item()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = _hand_loss(logits, batch["labels"], batch["loss_weight"])
        assert got == pytest.approx(want, rel=1e-4)
        losses[alpha] = got
        # label rows: short targets; rationale rows: long; per-example means make alpha move the loss
    assert losses[0.2] != pytest.approx(losses[0.8], rel=1e-3)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_stops_before_training(tmp_path, pal_set):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "traces.jsonl").write_text("")
    (empty / "manifest.json").write_text("{}")
    with pytest.raises(TrainError, match="empty"):
        train_student(tiny_cfg(), empty, tmp_path / "o1")
    no_programs = write_trace_set(tmp_path / "noprog", n=3, style="pal", programs=False)
    with pytest.raises(TrainError, match=r"student.format 'pal' needs a program.*traces.style: pal"):
        train_student(tiny_cfg(), no_programs, tmp_path / "o2")
    with pytest.raises(TrainError, match="train.max_length=20 is not longer than the longest prompt"):
        train_student(tiny_cfg(train={"max_length": 20}), pal_set, tmp_path / "o3")
    with pytest.raises(TrainError, match=r"train.max_length=150 would cut .* raise train.max_length to at least"):
        train_student(tiny_cfg(train={"max_length": 150}), pal_set, tmp_path / "o4")
    with pytest.raises(TrainError, match=r"student.lora_target_modules: \['query'\].*q_proj"):
        train_student(tiny_cfg(student={"lora_target_modules": ["query"]}), pal_set, tmp_path / "o5")
    with pytest.raises(TrainError, match="no trace set"):
        train_student(tiny_cfg(), tmp_path / "missing", tmp_path / "o6")
    for i in range(1, 7):
        assert not (tmp_path / f"o{i}" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ resume
class _Killed(Exception):
    pass


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_resume_after_kill_equals_straight_run(tmp_path, tokenizer, pal_set):
    from transformers import TrainerCallback

    from reasonlite.models import load_model
    from reasonlite.train.sft import prepare_model, run_sft

    cfg = tiny_cfg(train={"max_steps": 6, "save_steps": 3, "batch_size": 2, "warmup_ratio": 0.2})
    examples, _ = trace_examples(cfg, load_trace_set(pal_set).traces, tokenizer)
    ds = build_dataset(cfg, examples, tokenizer)

    def fresh():
        model, _ = load_model(TINY, device="cpu")
        return prepare_model(cfg, model)

    straight = run_sft(cfg, fresh(), tokenizer, ds, tmp_path / "straight")
    assert straight.steps == 6

    class KillAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise _Killed(state.global_step)

    with pytest.raises(_Killed):
        run_sft(cfg, fresh(), tokenizer, ds, tmp_path / "killed", callbacks=[KillAfterFirstSave()])
    assert (tmp_path / "killed" / "checkpoint-3").is_dir()
    resumed = run_sft(cfg, fresh(), tokenizer, ds, tmp_path / "killed", resume=True)
    assert resumed.steps == 6
    a, b = _weights(straight.model), _weights(resumed.model)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-5)
    # and the untrained start really differs from the result (the comparison is not vacuous)
    start = _weights(fresh())
    assert any(not torch.allclose(start[k], a[k]) for k in a)


def test_resume_refuses_checkpoints_of_another_config(tmp_path, pal_set):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (out / "train_state.json").write_text(json.dumps({"train_hash": "something-else"}))
    with pytest.raises(TrainError, match="different training config"):
        train_student(tiny_cfg(), pal_set, out, resume=True)


def test_the_train_stage_cannot_read_a_knob_outside_its_hash(tmp_path, pal_set, monkeypatch):
    """Handed the whole config, train_student reads only the train stage's view: the eval-side inference cap (not in
    the train hash, so a change to it would reuse this cached student) fails naming the knob, before any step."""
    from reasonlite.config import StageConfigError
    from reasonlite.train import sft

    monkeypatch.setattr(sft, "prepare_model", lambda cfg, model: cfg.budget.reasoning_budget)
    cfg = build_config({"student": {"model": TINY}, "budget": {"reasoning_budget": 64}})
    with pytest.raises(StageConfigError, match=r"the train stage read budget\.reasoning_budget, .* add "
                                               r"'budget\.reasoning_budget' to STAGE_SECTIONS\['train'\]"):
        train_student(cfg, pal_set, tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ full pipeline
@pytest.fixture(scope="module")
def trained(tmp_path_factory, pal_set):
    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg(contrastive={"enabled": True, "max_steps": 2, "batch_size": 2, "learning_rate": 1e-2})
    return cfg, train_student(cfg, pal_set, out)


def test_train_student_writes_metrics_plot_and_a_loadable_export(trained):
    from reasonlite.models import load_model

    _cfg, result = trained
    out = result.export_dir.parent
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == result.steps == 2 and metrics["rows"] == 8
    assert metrics["train_seconds"] > 0 and metrics["tokens_per_second"] > 0
    assert metrics["contrastive"]["pairs"] == 8 and metrics["contrastive"]["steps"] == 2
    assert (out / "loss.png").stat().st_size > 1000
    meta = json.loads((result.export_dir / "reasonlite.json").read_text())
    assert meta["format"] == "pal" and meta["base_model"] == TINY and meta["budget_conditioned"] is False
    assert (result.export_dir / "model.safetensors").exists()
    assert not (result.export_dir / "adapter_config.json").exists()  # merged
    card = (result.export_dir / "README.md").read_text()
    assert "`pal`" in card and "trace set manifest sha256" in card and "learning_rate" in card

    model, tok = load_model(result.export_dir, device="cpu")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == eot
    assert not any("lora" in name for name, _ in model.named_parameters())
    prompt = tok.apply_chat_template(build_messages("How many pens?", "pal"), add_generation_prompt=True,
                                     tokenize=False)
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]

    from reasonlite.train import update_model_card

    update_model_card(result.export_dir, {"test": {"accuracy": 0.5}})
    card = (result.export_dir / "README.md").read_text()
    assert '"accuracy": 0.5' in card and card.count("## Evaluation") == 1
    assert "learning_rate" in card  # the rest of the card is kept


def test_contrastive_stage_changes_the_model_and_drops_the_ref_adapter(tmp_path, tokenizer, pal_set):
    from reasonlite.models import load_model
    from reasonlite.train.dpo import pair_rows, run_dpo
    from reasonlite.train.sft import prepare_model

    cfg = tiny_cfg(contrastive={"enabled": True, "max_steps": 2, "batch_size": 2, "learning_rate": 5e-2})
    trace_set = load_trace_set(pal_set)
    rows = pair_rows(cfg, trace_set.pairs, tokenizer)
    prompt = tokenizer.apply_chat_template(build_messages(trace_set.pairs[0].question, "pal"), tokenize=False,
                                           add_generation_prompt=True)
    assert rows[0]["prompt"] == prompt  # the same prompt the SFT rows and the inference engine use
    assert rows[0]["chosen"].endswith("<|im_end|>") and rows[0]["chosen"] != rows[0]["rejected"]
    model, _ = load_model(TINY, device="cpu")
    model = prepare_model(cfg, model)
    for name, p in model.named_parameters():  # a non-zero adapter, as after SFT
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    before = _weights(model)
    result = run_dpo(cfg, model, tokenizer, trace_set.pairs, tmp_path / "dpo")
    after = _weights(result.model)
    assert result.steps == 2 and result.pairs == 8
    assert list(result.model.peft_config) == ["default"]
    assert any(not torch.allclose(before[k], after[k]) for k in before)
    with pytest.raises(TrainError, match="contrastive.enabled needs a rationale format"):
        pair_rows(tiny_cfg(student={"format": "answer"}), trace_set.pairs, tokenizer)


def test_adapter_only_export_names_the_alias_and_reloads(tmp_path, pal_set):
    from reasonlite.models import load_model

    result = train_student(tiny_cfg(train={"max_steps": 1}), pal_set, tmp_path / "t", adapter_only=True)
    adapter_cfg = json.loads((result.export_dir / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == TINY
    assert not (result.export_dir / "ref").exists()
    model, tok = load_model(result.export_dir, device="cpu")
    assert json.loads((result.export_dir / "reasonlite.json").read_text())["format"] == "pal"
    with torch.no_grad():
        out = model(**tok(["hello"], return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)
