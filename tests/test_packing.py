"""Padding-free packing (`train.packing`) on tiny-random-llama: a packed row's logits equal each example run alone (no
cross-example attention), packed losses equal the unpacked ones (token mean and step_by_step's weighted loss), and
a packed run trains, resumes after a kill exactly like a straight run, and tracks the padded run's loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import TINY, _Killed, _weights, tiny_cfg, write_trace_set

from reasonlite.train.formats_data import build_dataset, load_trace_set, trace_examples


@pytest.fixture(scope="module")
def tokenizer():
    from reasonlite.models import load_tokenizer

    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def pal_set(tmp_path_factory) -> Path:
    return write_trace_set(tmp_path_factory.mktemp("pal"), n=8, style="pal")


def _model(attn: str = "sdpa"):
    from reasonlite.models import load_model

    model, _ = load_model(TINY, device="cpu")
    model.set_attn_implementation(attn)
    return model


def _rows(cfg, tokenizer, pal_set, n: int = 3) -> list[dict]:
    examples, _ = trace_examples(cfg, load_trace_set(pal_set).traces, tokenizer)
    ds = build_dataset(cfg, examples, tokenizer)
    return [ds[i] for i in range(n)]


# one row per batch (TRL's padding-free layout) or bins that force two rows, one of them holding two examples
LAYOUTS = {"one-row": lambda rows: None, "bins": lambda rows: max(len(r["input_ids"]) for r in rows) + 1 +
           min(len(r["input_ids"]) for r in rows)}


def _collate(rows, tokenizer, packing: bool, layout: str = "one-row"):
    from reasonlite.train.sft import WeightedCollator

    pack_length = LAYOUTS[layout](rows) if packing else None
    return WeightedCollator(pad_token_id=tokenizer.pad_token_id, padding_free=packing, pack_length=pack_length)(rows)


def _forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weight", "num_real_tokens")}
    return model(**inputs, use_cache=False)


def _segments(batch):
    """(row, start, end) of every example in a packed batch, in packed order."""
    out = []
    for row, pos in enumerate(batch["position_ids"]):
        starts = (pos == 0).nonzero().flatten().tolist()
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else len(pos)
            out.append((row, start, end))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_logits_equal_each_example_run_alone(attn, layout, tokenizer, pal_set):
    model = _model(attn)
    rows = _rows(tiny_cfg(), tokenizer, pal_set)
    packed = _collate(rows, tokenizer, packing=True, layout=layout)
    assert "attention_mask" not in packed
    assert packed["input_ids"].size(0) == (1 if layout == "one-row" else 2)
    with torch.no_grad():
        logits = _forward(model, packed).logits
        seen = 0
        for row, start, end in _segments(packed):
            ids = packed["input_ids"][row, start:end].tolist()
            match = [r for r in rows if r["input_ids"] == ids[: len(r["input_ids"])]]
            assert len(match) == 1
            n = len(match[0]["input_ids"])  # a row's last example is followed by padding
            alone = model(input_ids=torch.tensor([match[0]["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, start:start + n], alone, atol=1e-5, rtol=1e-5)
            seen += 1
        assert seen == len(rows)
        # the check has teeth: the same row without restarting positions lets later examples see earlier ones
        flat = model(input_ids=packed["input_ids"], use_cache=False).logits
        row, start, _ = next(seg for seg in _segments(packed) if seg[1] > 0)
        assert not torch.allclose(flat[row, start:], logits[row, start:], atol=1e-3)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_loss_equals_the_unpacked_token_mean(layout, tokenizer, pal_set):
    model = _model()
    rows = _rows(tiny_cfg(), tokenizer, pal_set)
    packed, padded = _collate(rows, tokenizer, True, layout), _collate(rows, tokenizer, packing=False)
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    with torch.no_grad():
        loss_packed = model(**{k: v for k, v in packed.items() if k != "num_real_tokens"}, use_cache=False).loss
        loss_padded = model(**padded, use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_step_by_step_weighted_loss_is_unchanged(layout, tokenizer, tmp_path):
    from reasonlite.train.sft import weighted_example_loss

    cot = write_trace_set(tmp_path / "cot", n=4, style="cot")
    cfg = tiny_cfg(student={"format": "step_by_step"}, train={"step_by_step_alpha": 0.3})
    rows = _rows(cfg, tokenizer, cot, n=4)  # label, rationale, label, rationale
    model = _model()
    packed, padded = _collate(rows, tokenizer, True, layout), _collate(rows, tokenizer, packing=False)
    assert sorted(packed["loss_weight"].tolist()) == pytest.approx([0.3, 0.3, 0.7, 0.7])
    with torch.no_grad():
        a = weighted_example_loss(_forward(model, packed).logits, packed["labels"], packed["loss_weight"],
                                  packed["position_ids"])
        b = weighted_example_loss(_forward(model, padded).logits, padded["labels"], padded["loss_weight"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_training_resumes_like_a_straight_run_and_tracks_padded_loss(tmp_path, tokenizer, pal_set):
    from transformers import TrainerCallback

    from reasonlite.train.sft import prepare_model, run_sft

    train = {"max_steps": 4, "save_steps": 2, "batch_size": 2, "warmup_ratio": 0.0}
    cfg = tiny_cfg(train={**train, "packing": True, "num_threads": 1})
    examples, _ = trace_examples(cfg, load_trace_set(pal_set).traces, tokenizer)
    ds = build_dataset(cfg, examples, tokenizer)

    def fresh():
        return prepare_model(cfg, _model())

    straight = run_sft(cfg, fresh(), tokenizer, ds, tmp_path / "straight")
    assert straight.steps == 4 and straight.tokens_per_second > 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)

    class KillAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise _Killed(state.global_step)

    with pytest.raises(_Killed):
        run_sft(cfg, fresh(), tokenizer, ds, tmp_path / "killed", callbacks=[KillAfterFirstSave()])
    resumed = run_sft(cfg, fresh(), tokenizer, ds, tmp_path / "killed", resume=True)
    assert resumed.steps == 4
    a, b = _weights(straight.model), _weights(resumed.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-5)

    # same data order, same maths: the padded run's loss curve matches the packed one
    padded = run_sft(tiny_cfg(train=train), fresh(), tokenizer, ds, tmp_path / "padded")
    assert [h["loss"] for h in padded.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-3)


def test_group_by_length_trains(tmp_path, tokenizer, pal_set, monkeypatch):
    from reasonlite.train import sft
    from reasonlite.train.sft import prepare_model, run_sft

    drawn = []  # the trainer draws its batches from the shuffled sampler, not transformers' own
    original = sft.ShuffledLengthGroupedSampler.__iter__
    monkeypatch.setattr(sft.ShuffledLengthGroupedSampler, "__iter__", lambda self: drawn.append(1) or original(self))
    cfg = tiny_cfg(train={"max_steps": 2, "batch_size": 2, "group_by_length": True})
    examples, _ = trace_examples(cfg, load_trace_set(pal_set).traces, tokenizer)
    run = run_sft(cfg, prepare_model(cfg, _model()), tokenizer, build_dataset(cfg, examples, tokenizer), tmp_path)
    assert run.steps == 2 and run.final_loss == run.final_loss  # finite, not NaN
    assert drawn


def test_length_grouped_batches_come_in_shuffled_order_not_longest_to_shortest():
    """transformers sorts each megabatch of 50 batches longest -> shortest, so a run ending on a megabatch's end
    trained last on its shortest rows; the trainer's sampler keeps the homogeneous batches but shuffles their order."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from reasonlite.train.sft import ShuffledLengthGroupedSampler

    lengths = [int(x) for x in torch.randint(20, 400, (800,), generator=torch.Generator().manual_seed(0))]
    hf = list(LengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    ours = list(ShuffledLengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    batches = lambda order: [tuple(order[i: i + 4]) for i in range(0, len(order), 4)]
    assert sorted(ours) == list(range(800))  # every row once
    assert sorted(batches(ours)) == sorted(batches(hf))  # the very same batches: as little padding
    longest = lambda order: [max(lengths[i] for i in b) for b in batches(order)]
    # HF: within each megabatch (50 batches) the longest row never grows from one batch to the next
    assert all(a >= b for a, b in zip(longest(hf)[1:50], longest(hf)[2:50]))
    # ours: the last 10 batches are not the shortest of anything; they span the range like any other 10
    assert max(longest(ours)[-10:]) > sorted(longest(hf))[len(longest(hf)) // 2]
    again = list(ShuffledLengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    assert again == ours  # seeded: a resumed run replays the same order
