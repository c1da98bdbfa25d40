"""Logprobs on the llama.cpp backend (SmolLM2 GGUF) through the gateway, with the official `openai` client: one
entry per generated token, the greedy token is the most likely one, the stream carries the same entries as the whole
answer, the grammar's distribution is the one reported, and bad values are the client's 400."""

from __future__ import annotations

import math

import openai
import pytest
from gateway_helpers import serve_gateway
from test_gateway_integration import smollm2_gguf

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client():
    # prompts computed whole: a prompt computed after a kept prefix can give slightly different logits (see the
    # backend's docstring), and these tests compare the logprobs of the same request asked twice
    model = {"name": "smol", "backend": "llamacpp", "model": str(smollm2_gguf()), "n_threads": 2,
             "prefix_cache": False}
    with serve_gateway({"models": [model], "server": {"access_log": False}}) as served:
        yield openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=120)


def streamed_entries(chunks) -> list:
    return [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]


def test_chat_logprobs_are_one_per_token_and_the_greedy_token_is_the_top_one(client):
    r = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 4 and e.logprob <= 0
        assert (e.token, e.logprob) == (e.top_logprobs[0].token, e.top_logprobs[0].logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6
    stream = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=4, stream=True)
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in streamed_entries(stream)] == [
        (e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in content]
    plain = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None  # only when asked


def test_sampled_tokens_report_their_own_logprob_and_seeds_reproduce_the_stream(client):
    kw = {"model": "smol", "messages": QUESTION, "max_tokens": 16, "temperature": 1.0, "seed": 7, "logprobs": True,
          "top_logprobs": 0}
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(e.logprob <= 0 and e.top_logprobs == [] for e in content)
    assert [(e.token, e.logprob) for e in streamed_entries(client.chat.completions.create(**kw, stream=True))] == [
        (e.token, e.logprob) for e in content]


def test_logprobs_are_those_the_grammar_left(client):
    """With a json_schema the first token must open the object: the reported distribution is the one after the
    grammar, so every alternative it lists is allowed, and the chosen token is more likely than unconstrained."""
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
              "additionalProperties": False}
    kw = {"model": "smol", "messages": QUESTION, "max_tokens": 20, "temperature": 0, "logprobs": True,
          "top_logprobs": 5}
    free = client.chat.completions.create(**kw).choices[0].logprobs.content[0]
    constrained = client.chat.completions.create(**kw, response_format={
        "type": "json_schema", "json_schema": {"name": "c", "schema": schema}}).choices[0].logprobs.content
    first = constrained[0]
    assert first.token.lstrip().startswith("{")
    assert all(t.token.strip() == "" or t.token.lstrip().startswith("{") or t.logprob == -9999.0
               for t in first.top_logprobs)
    unconstrained = {t.token: t.logprob for t in free.top_logprobs}
    assert first.token not in unconstrained or first.logprob > unconstrained[first.token]
    assert all((e.token, e.logprob) == (e.top_logprobs[0].token, e.top_logprobs[0].logprob) for e in constrained)


def test_text_completions_return_logprobs_in_their_own_shape(client):
    prompt = "The capital of France is"
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == logprob and top[token] == logprob
    stream = client.completions.create(model="smol", prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                       stream=True)
    tokens, offsets = [], []
    for c in stream:
        if c.choices and c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            offsets += c.choices[0].logprobs.text_offset
    assert (tokens, offsets) == (lp.tokens, lp.text_offset)
    echoed = client.completions.create(model="smol", prompt=prompt, max_tokens=2, temperature=0, logprobs=0,
                                       echo=True).choices[0].logprobs
    assert echoed.text_offset[0] == len(prompt) and echoed.top_logprobs == [{}, {}]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"logprobs": 3}, "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": "two"}, "logprobs"),
])
def test_logprobs_out_of_range_are_the_clients_400(client, path, body, param):
    with pytest.raises(openai.BadRequestError) as bad:
        if path == "chat":
            client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=2, extra_body=body)
        else:
            client.completions.create(model="smol", prompt="x", max_tokens=2, extra_body=body)
    assert bad.value.body["param"] == param and param in bad.value.body["message"]
