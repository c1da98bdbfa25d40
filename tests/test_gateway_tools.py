"""Function calling on a local model (slm_fusion.tools) through the official `openai` client: a forced call is
constrained while decoding, so even a *random* model's calls always name a listed function with arguments that match
its schema (and its `json_schema` replies always validate); `auto` replies that are calls become tool_calls;
tool-call history is accepted; bad tool_choice is a 400."""

from __future__ import annotations

import json
import typing
from concurrent.futures import ThreadPoolExecutor

import openai
import pydantic
import pytest
from gateway_helpers import TINY, serve_gateway

from slm_fusion import protocol as P
from slm_fusion import tools
from slm_fusion.backends.base import Generation

PRICE = {"type": "function", "function": {
    "name": "get_price", "description": "Price of an item in a store",
    "parameters": {"type": "object", "properties": {"item": {"type": "string", "enum": ["pen", "mug", "lamp"]},
                                                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["item", "quantity"], "additionalProperties": False}}}
STOCK = {"type": "function", "function": {
    "name": "in_stock", "description": "Whether an item is in stock",
    "parameters": {"type": "object", "properties": {"item": {"type": "string", "enum": ["pen", "mug"]}},
                   "required": ["item"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "How much are 3 mugs?"}]


@pytest.fixture(scope="module")
def client():
    # room for 100 rows at once: the 100-sample tests send ten requests of n=10 together
    with serve_gateway({"models": [{**TINY, "max_output_tokens": 48, "max_batch_size": 100,
                                    "max_concurrency": 10}]}) as served:
        yield openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0)


def _valid_call(call, allowed: set[str]) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
    args = json.loads(call.function.arguments)
    if call.function.name == "get_price":
        assert set(args) == {"item", "quantity"} and args["item"] in ("pen", "mug", "lamp")
        assert isinstance(args["quantity"], int) and 1 <= args["quantity"] <= 9
    else:
        assert set(args) == {"item"} and args["item"] in ("pen", "mug")
    return args


@pytest.fixture(scope="module", params=["tiny", pytest.param("smol", marks=pytest.mark.integration)])
def sampled(request):
    """(client, model name) for the 100-sample tests: the random tiny model, and SmolLM2-135M (integration)."""
    if request.param == "tiny":
        yield request.getfixturevalue("client"), "tiny"
        return
    smol = {"name": "smol", "backend": "transformers", "model": "smollm2-135m-instruct", "max_output_tokens": 48,
            "max_batch_size": 100, "max_concurrency": 10, "torch_threads": 2}
    with serve_gateway({"models": [smol]}) as served:
        yield openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0, timeout=600), "smol"


def test_required_calls_sampled_at_temperature_1_always_parse_and_match_the_schema(sampled):
    """100 of 100 calls sampled at temperature 1.0 (ten concurrent requests of n=10, decoded together)."""
    client, model = sampled

    def ask(seed: int):
        return client.chat.completions.create(model=model, messages=ASK, tools=[PRICE, STOCK], tool_choice="required",
                                              temperature=1.0, n=10, seed=seed, max_tokens=48).choices

    with ThreadPoolExecutor(10) as pool:
        choices = [c for got in pool.map(ask, range(10)) for c in got]
    assert len(choices) == 100
    for c in choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
        _valid_call(c.message.tool_calls[0], {"get_price", "in_stock"})
    assert len({c.message.tool_calls[0].function.arguments for c in choices}) > 1  # sampled, not one greedy call


class Order(pydantic.BaseModel):
    item: typing.Literal["pen", "mug", "lamp"]
    quantity: int = pydantic.Field(ge=1, le=9)
    gift: bool
    note: str = pydantic.Field(max_length=12)


def test_json_schema_outputs_sampled_at_temperature_1_always_parse_and_validate(sampled):
    """100 of 100 `json_schema` (strict) replies sampled at temperature 1.0 validate, parsed by the official SDK."""
    client, model = sampled

    def ask(seed: int):
        return client.chat.completions.parse(model=model, messages=ASK, response_format=Order, temperature=1.0,
                                             n=10, seed=seed, max_tokens=48).choices

    with ThreadPoolExecutor(10) as pool:
        choices = [c for got in pool.map(ask, range(10)) for c in got]
    assert len(choices) == 100
    for c in choices:
        assert c.finish_reason == "stop" and isinstance(c.message.parsed, Order), c.message.content
    assert len({c.message.content for c in choices}) > 1


def test_a_named_function_is_the_one_called(client):
    resp = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[PRICE, STOCK], temperature=1.0, n=4, max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "in_stock"}})
    assert all(c.message.tool_calls[0].function.name == "in_stock" for c in resp.choices)
    for c in resp.choices:
        _valid_call(c.message.tool_calls[0], {"in_stock"})


def test_a_streamed_call_arrives_as_a_tool_call_delta(client):
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=[PRICE], tool_choice="required",
                                            temperature=0, max_tokens=48, stream=True)
    deltas, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(deltas) == 1 and deltas[0].index == 0
    assert deltas[0].function.name == "get_price" and deltas[0].id.startswith("call_")
    args = json.loads(deltas[0].function.arguments)
    assert set(args) == {"item", "quantity"}


def test_tool_call_history_is_accepted_and_rendered(client):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_price",
                                                           "arguments": '{"item": "mug", "quantity": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12.00"}]
    resp = client.chat.completions.create(model="tiny", messages=history, tools=[PRICE], max_tokens=8,
                                          temperature=0)
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")
    plan = tools.plan_of([PRICE], "auto")
    rendered = tools.messages_for([P.ChatMessage.model_validate(m) for m in history], plan)
    assert rendered[0]["role"] == "system" and "get_price" in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": '{"name": "get_price", "arguments": {"item": "mug", '
                                                           '"quantity": 3}}'}
    assert rendered[3] == {"role": "user", "content": "Function get_price returned: 12.00"}


def test_bad_tool_choice_and_tools_are_400s_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=[PRICE],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice" and "not in tools" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=[{"type": "function", "function": {}}])
    assert e.value.body["param"] == "tools"


def test_auto_replies_that_are_calls_become_tool_calls_and_other_text_stays():
    plan = tools.plan_of([PRICE, STOCK], None)
    assert plan.mode == "auto" and tools.response_format(plan) is None  # auto: the model may answer in text
    gens = [Generation('{"name": "in_stock", "arguments": {"item": "pen"}}', "stop", 5, 9),
            Generation('```json\n{"name": "get_price", "arguments": {"item": "mug", "quantity": 2}}\n```', "stop",
                       5, 20),
            Generation("Three mugs cost 12 dollars.", "stop", 5, 7),
            Generation('{"name": "delete_all", "arguments": {}}', "stop", 5, 9),
            Generation('{"name": "in_stock", "arguments": {"item": "pe', "length", 5, 9)]
    out = tools.as_tool_calls(gens, plan)
    assert [g.finish_reason for g in out] == ["tool_calls", "tool_calls", "stop", "stop", "length"]
    assert json.loads(out[1].tool_calls[0]["function"]["arguments"]) == {"item": "mug", "quantity": 2}
    assert out[2].text == "Three mugs cost 12 dollars." and out[3].tool_calls is None  # unknown function: text
    assert tools.plan_of([PRICE], "none") is None
