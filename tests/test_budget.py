"""Data-side trace budget: token counting with the student tokenizer, policies, statistics, buckets."""

from __future__ import annotations

import pytest

from reasonlite.budget import (
    TRUNCATION_MARKER,
    apply_budget,
    budget_bucket,
    count_tokens,
    count_tokens_many,
    token_stats,
)
from reasonlite.traces import Trace


@pytest.fixture(scope="module")
def tokenizer():
    from reasonlite.models import load_tokenizer

    return load_tokenizer("tiny-random-llama")


def _t(qid: str, i: int, n_words: int, status="correct", style="cot") -> Trace:
    text = " ".join(["step"] * n_words) + " The answer is 1."
    return Trace(id=f"{qid}#{i}", example_id=qid, question="Q", style=style, text=text, status=status,
                 rationale=text if style != "pal" else None, program=text if style == "pal" else None,
                 sample_index=i, answer="1")


def test_count_tokens_uses_the_student_tokenizer(tokenizer):
    text = "The store sells 21 * 3 = 63 pens."
    assert count_tokens(text, tokenizer) == 15  # recorded: tiny-random-llama splits it into 15 ids, no BOS
    assert count_tokens(text) == 9  # the len/4 estimate without a tokenizer: ceil(33 / 4)
    assert count_tokens("", tokenizer) == 0 and count_tokens(None) == 0
    assert count_tokens_many([text, None, "ab"], tokenizer) == [count_tokens(text, tokenizer), 0,
                                                                 count_tokens("ab", tokenizer)]


def test_drop_policy(tokenizer):
    traces = [_t("a", 0, 5), _t("a", 1, 40), _t("b", 0, 60)]
    kept = apply_budget(traces, 20, "drop", tokenizer)
    assert [t.id for t in kept] == ["a#0"] and kept[0].tokens == count_tokens(traces[0].rationale, tokenizer)
    assert traces[0].tokens is None  # the input is not modified
    assert len(apply_budget(traces, None, "drop", tokenizer)) == 3


def test_prefer_shortest_keeps_one_per_question(tokenizer):
    traces = [_t("a", 0, 30), _t("a", 1, 8), _t("a", 2, 3, status="wrong"), _t("b", 0, 50), _t("b", 1, 70)]
    kept = {t.example_id: t.id for t in apply_budget(traces, 20, "prefer_shortest", tokenizer)}
    # a: the shortest correct trace that fits; b: nothing fits, so the shortest correct one stays
    assert kept == {"a": "a#1", "b": "b#0"}


def test_truncate_policy_cuts_to_the_budget_with_a_marker(tokenizer):
    traces = [_t("a", 0, 5), _t("b", 0, 80), _t("c", 0, 80, style="pal")]
    out = apply_budget(traces, 24, "truncate", tokenizer)
    assert not out[0].truncated and out[0].rationale == traces[0].rationale
    for t, field in ((out[1], "rationale"), (out[2], "program")):
        text = getattr(t, field)
        assert t.truncated and text.endswith(TRUNCATION_MARKER)
        assert t.tokens == count_tokens(text, tokenizer) <= 24
    with pytest.raises(ValueError, match="data_policy"):
        apply_budget(traces, 24, "squeeze", tokenizer)


def test_token_stats_and_buckets():
    stats = token_stats([10, 20, 30, 40, 100])
    assert stats == {"n": 5, "mean": 40.0, "p50": 30.0, "p95": 88.0, "max": 100}
    assert token_stats([])["n"] == 0
    buckets = [32, 64, 128]
    assert [budget_bucket(n, buckets) for n in (1, 32, 33, 128, 500)] == [32, 32, 64, 128, 128]


def test_budget_in_a_trace_set_reports_before_and_after(tmp_path):
    from reasonlite.config import build_config
    from reasonlite.traces import build_trace_set

    cfg = build_config({"runs_dir": str(tmp_path), "data": {"n_train": 10},
                        "traces": {"style": "cot"}, "student": {"model": "tiny-random-llama", "format": "cot"},
                        "budget": {"max_trace_tokens": 70, "data_policy": "drop"}})
    ts = build_trace_set(cfg, tmp_path / "out", show_progress=False)
    m = ts.manifest["tokens"]
    assert m["before_budget"]["n"] == 10 and m["after_budget"]["max"] <= 70
    assert 0 < ts.manifest["budget"]["removed"] == 10 - len(ts.traces) == 10 - m["after_budget"]["n"]
    assert all(t.tokens <= 70 for t in ts.traces)
