"""`/v1/responses` through the official `openai` client: text, streaming events, function calls (local and from an
upstream's tool_calls), input items, and 400s naming the field. The request runs as one chat completion, so what
the upstream is sent is asserted too."""

from __future__ import annotations

import json

import openai
import pytest
from gateway_helpers import TINY, serve, serve_gateway, upstream_model

from slm_fusion.backends.mock_upstream import ANSWER, TOOL_CALL, MockUpstream

PRICE = {"type": "function", "name": "get_price", "description": "Price of an item",
         "parameters": {"type": "object", "properties": {"item": {"type": "string", "enum": ["pen", "mug"]}},
                        "required": ["item"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def served():
    mock = MockUpstream()
    with serve(mock) as upstream:
        models = [{**TINY, "max_output_tokens": 48}, upstream_model("up", upstream.url),
                  upstream_model("up-tools", upstream.url, "tools"), upstream_model("up-bad", upstream.url, "bad-shape")]
        with serve_gateway({"models": models}) as gw:
            yield openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0), mock


def test_text_answer_is_a_response_object(served):
    client, mock = served
    r = client.responses.create(model="up", input="How many pens?", instructions="Be terse.",
                                max_output_tokens=20, temperature=0)
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == ANSWER
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens == 7 and r.usage.output_tokens > 0
    # the upstream got the same request as a chat completion, nothing added
    assert mock.received[-1] == {"model": "mock", "messages": [{"role": "system", "content": "Be terse."},
                                                               {"role": "user", "content": "How many pens?"}],
                                 "temperature": 0.0, "max_completion_tokens": 20}


def test_an_upstreams_tool_calls_become_function_call_items(served):
    client, _ = served
    r = client.responses.create(model="up-tools", input="Weather in Paris?", tools=[PRICE])
    assert r.output[0].type == "function_call" and r.output[0].call_id == TOOL_CALL["id"]
    assert r.output[0].name == "get_weather" and r.output[0].arguments == TOOL_CALL["function"]["arguments"]
    events = list(client.responses.create(model="up-tools", input="Weather in Paris?", tools=[PRICE], stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == TOOL_CALL["function"]["arguments"]  # fragments joined


def test_a_broken_upstream_stream_ends_failed_with_an_error_event(served):
    client, _ = served
    events = list(client.responses.create(model="up-bad", input="x", stream=True))
    assert any(e.type == "error" for e in events) and events[-1].type == "response.failed"


def test_streamed_events_come_in_order_and_add_up(served):
    client, _ = served
    events = list(client.responses.create(model="up", input="Count the mugs.", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta") \
        < kinds.index("response.output_text.done") < kinds.index("response.output_item.done")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == ANSWER == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.usage.output_tokens > 0


def test_a_local_model_calls_the_function_and_gets_its_output_back(served):
    client, _ = served
    r = client.responses.create(model="tiny", input="Price of a mug?", tools=[PRICE], tool_choice="required",
                                temperature=1.0, max_output_tokens=40)
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_price" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["item"] in ("pen", "mug")
    follow = client.responses.create(model="tiny", max_output_tokens=8, temperature=0, tools=[PRICE], input=[
        {"role": "user", "content": "Price of a mug?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "4.50"}])
    assert follow.status in ("completed", "incomplete")
    streamed = list(client.responses.create(model="tiny", input="Price of a pen?", tools=[PRICE], stream=True,
                                            tool_choice={"type": "function", "name": "get_price"},
                                            max_output_tokens=40))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments)["item"] in ("pen", "mug")
    assert streamed[-1].response.output[0].type == "function_call"


def test_what_cannot_be_served_is_a_400_naming_the_field(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="up", input="x", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools" and "function and file_search tools" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="up", input=[{"type": "input_image", "image_url": "data:,"}])
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
