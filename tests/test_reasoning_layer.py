"""The gateway's reasoning layer (slm_fusion.reasoning) through the official `openai` client against real servers.

- budget forcing on `tiny-random-llama` (a random model never answers on its own, so every request is forced);
- PAL execution and self-consistency on a scripted OpenAI-compatible upstream (tests/routing_upstream.py), so the
  answers are known.
"""

from __future__ import annotations

import openai
import pytest
from gateway_helpers import TINY, serve, serve_gateway, upstream_model
from routing_upstream import make_upstream

from slm_fusion.config import ConfigError, FusionConfig


@pytest.fixture(scope="module")
def tiny_gateway():
    with serve_gateway({"models": [TINY, {**TINY, "name": "tiny-budget", "reasoning": {"reasoning_budget": 10}}]}) \
            as served:
        yield served


@pytest.fixture(scope="module")
def scripted():
    app, hits = make_upstream()
    with serve(app) as upstream:
        cfg = {"models": [upstream_model("small", upstream.url, "small"),
                          upstream_model("small-pal", upstream.url, "small", reasoning={"pal": True}),
                          upstream_model("small-vote", upstream.url, "small", reasoning={"vote": True, "samples": 3}),
                          upstream_model("student", upstream.url, "echo-prompt",
                                         reasoning={"format": "cot", "student_prompt": True})]}
        with serve_gateway(cfg) as served:
            yield openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0), hits


def _client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0)


def test_budget_forcing_caps_reasoning_and_always_yields_an_answer_part(tiny_gateway):
    client = _client(tiny_gateway)
    for budget in (8, 20):
        resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2+2?"}],
                                              max_tokens=64, extra_body={"reasoning_budget": budget})
        info = resp.choices[0].model_extra["slm_fusion"]
        details = resp.usage.completion_tokens_details
        assert info["forced"] is True  # a random model never finishes its answer within the cap
        assert details.reasoning_tokens == info["reasoning_tokens"] <= budget
        assert 1 <= details.model_extra["answer_tokens"] <= 16  # the model's default answer_tokens
        assert resp.usage.completion_tokens == details.reasoning_tokens + details.model_extra["answer_tokens"]
        assert "The answer is" in resp.choices[0].message.content  # the forced cue is part of the text


def test_model_default_budget_applies_without_extras_and_request_overrides_it(tiny_gateway):
    client = _client(tiny_gateway)
    default = client.chat.completions.create(model="tiny-budget", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=64)
    assert default.usage.completion_tokens_details.reasoning_tokens <= 10
    wider = client.chat.completions.create(model="tiny-budget", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=64, extra_body={"reasoning_budget": 30})
    assert 10 < wider.usage.completion_tokens_details.reasoning_tokens <= 30
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert plain.usage.completion_tokens_details is None and "slm_fusion" not in (plain.choices[0].model_extra or {})


def test_budget_below_the_answer_cue_is_a_400_naming_the_field(tiny_gateway):
    with pytest.raises(openai.BadRequestError) as err:
        _client(tiny_gateway).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                      extra_body={"reasoning_budget": 2})
    assert err.value.body["param"] == "reasoning_budget" and "at least" in err.value.body["message"]


def test_streaming_with_a_budget_sends_the_forced_answer_and_usage(tiny_gateway):
    stream = _client(tiny_gateway).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=64, stream=True,
        stream_options={"include_usage": True}, extra_body={"reasoning_budget": 8})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert "The answer is" in text and usage and usage[-1].completion_tokens <= 8 + 16


def test_pal_executes_the_program_and_answers_with_its_result(scripted):
    client, _ = scripted
    resp = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "[pal-ok] 6 by 7?"}],
                                          extra_body={"pal": True})
    info = resp.choices[0].model_extra["slm_fusion"]
    assert resp.choices[0].message.content == "42"
    assert info["status"] == "ok" and info["answer"] == "42" and "def solution" in info["program"]


def test_pal_exec_error_is_a_status_not_a_server_error(scripted):
    client, _ = scripted
    resp = client.chat.completions.create(model="small-pal",  # pal from the model's defaults
                                          messages=[{"role": "user", "content": "[pal-broken] divide"}])
    info = resp.choices[0].model_extra["slm_fusion"]
    assert info["status"] == "exec_error" and "ZeroDivision" in info["error"]
    assert "1 / 0" in resp.choices[0].message.content  # what the model wrote, since there is no result


def test_vote_returns_one_choice_with_the_agreement(scripted):
    client, _ = scripted
    sure = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "how many?"}], n=5,
                                          extra_body={"vote": True})
    assert len(sure.choices) == 1
    info = sure.choices[0].model_extra["slm_fusion"]
    assert info["answer"] == "7" and info["agreement"] == 1.0 and info["samples"] == 5 and info["votes"] == {"7": 5}
    unsure = client.chat.completions.create(model="small-vote", messages=[{"role": "user", "content": "[unsure]"}])
    info = unsure.choices[0].model_extra["slm_fusion"]
    assert info["samples"] == 3 and info["agreement"] == pytest.approx(1 / 3, abs=1e-3)  # answers 0, 1, 2
    assert sum(info["votes"].values()) == 3


def test_reasoning_defaults_are_validated_with_the_field_path():
    with pytest.raises((ConfigError, ValueError)) as err:
        FusionConfig.model_validate({"models": [{**TINY, "reasoning": {"budget": 64}}]})
    assert "budget" in str(err.value)
    with pytest.raises((ConfigError, ValueError)) as err:
        FusionConfig.model_validate({"models": [{**TINY, "reasoning": {"format": "sql"}}]})
    assert "format" in str(err.value)


def test_student_prompt_asks_in_the_students_training_prompt(scripted):
    from reasonlite.formats import build_messages

    client, _ = scripted
    resp = client.chat.completions.create(model="student", messages=[
        {"role": "system", "content": "You are helpful."}, {"role": "user", "content": "How many pens?"}])
    sent = resp.choices[0].message.content  # the upstream echoes the last message it received
    assert sent == build_messages("How many pens?", "cot")[0]["content"]


def test_a_budget_conditioned_student_is_told_the_same_bucket_by_the_gateway_and_by_reasonlite(tmp_path):
    """Regression: the gateway stated the raw reasoning_budget (50) to a student trained on buckets 32/64."""
    import json

    from reasonlite.infer import Student
    from reasonlite.models import resolve_model_dir
    from slm_fusion.backends.base import GenerationRequest
    from slm_fusion.reasoning import ReasoningLayer, _Plan

    for f in resolve_model_dir("tiny-random-llama").iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "reasonlite.json").write_text(json.dumps({"format": "pal", "budget_conditioned": True,
                                                          "budget_buckets": [32, 64]}))
    model_cfg = FusionConfig.model_validate({"models": [{**TINY, "model": str(tmp_path),
                                                         "reasoning": {"student_prompt": True}}]}).models[0]
    gen = GenerationRequest(messages=[{"role": "user", "content": "Q?"}])
    for budget, told in ((50, 32), (64, 64), (500, 64), (10, 32)):
        plan = _Plan(fmt="pal", budget=budget, vote=False, samples=1, temperature=0.0, answer_tokens=16)
        messages = ReasoningLayer()._messages(gen, plan, model_cfg.reasoning, model_cfg)
        assert f"Use at most {told} tokens." in messages[-1]["content"]
        assert f"Use at most {told} tokens." in Student(str(tmp_path)).prompt("Q?", budget=budget)


@pytest.mark.parametrize("fmt", ["pal", "cot"])
def test_the_gateway_serves_a_student_exactly_as_reasonlite_eval_measures_it(tmp_path, fmt):
    """One controller (reasonlite.controller): the same student, question and budget give the same text, answer and
    token split through `Student.solve` (what `reasonlite eval` runs) and through the gateway's reasoning layer on the
    transformers backend. tiny-random-llama never answers on its own, so every request is capped and forced."""
    import json

    from reasonlite.infer import Student
    from reasonlite.models import resolve_model_dir

    for f in resolve_model_dir("tiny-random-llama").iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "reasonlite.json").write_text(json.dumps({"format": fmt}))
    question, budget = "A shop has 12 pens and sells 5. How many are left?", 12
    want = Student(str(tmp_path), answer_tokens=6).solve(question, budget=budget)
    model = {**TINY, "name": "student", "model": str(tmp_path),
             "reasoning": {"student_prompt": True, "format": fmt, "answer_tokens": 6}}
    with serve_gateway({"models": [model]}) as served:
        resp = _client(served).chat.completions.create(
            model="student", messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0,
            extra_body={"reasoning_budget": budget})
    got = resp.model_dump()["choices"][0]
    assert want.forced and got["slm_fusion"]["forced"]
    assert got["slm_fusion"].get("answer") == want.answer
    assert (got["slm_fusion"].get("program"), want.program) == (want.program, got["slm_fusion"].get("program"))
    assert got["message"]["content"] == (want.answer if want.program and want.answer else want.text)
    assert got["slm_fusion"]["reasoning_tokens"] == want.reasoning_tokens == budget
    if fmt == "pal":  # both stop the forced `return` line at its newline; cot: reasonlite stops at the period
        assert got["slm_fusion"]["answer_tokens"] == want.answer_tokens
