"""/v1/embeddings proxied to an OpenAI-compatible upstream (`embeddings.backend: openai`), with the official `openai`
client against a real uvicorn gateway and the recording mock upstream: the body arrives as sent, the answer comes
back as the upstream gave it (base64 included), and failures are OpenAI-shaped without the upstream's URL."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest
from gateway_helpers import serve_gateway

from slm_fusion.config import FusionConfig


def gateway(upstream, **embeddings):
    config = {"name": "embed", "backend": "openai", "base_url": upstream.v1, **embeddings}
    return serve_gateway({"embeddings": config, "server": {"access_log": False}})


@pytest.fixture(scope="module")
def served(upstream):
    with gateway(upstream) as s:
        yield s


def client_of(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=30)


def test_the_body_reaches_the_upstream_unchanged_and_its_answer_the_client(served, upstream):
    body = {"model": "embed", "input": ["a cat", "a much longer sentence"], "encoding_format": "float",
            "dimensions": 4, "user": "u-1", "x_vendor_option": {"keep": [1, 2]}}
    r = httpx.post(served.v1 + "/embeddings", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert upstream.mock.received[-1] == body  # no field added, renamed or dropped
    direct = httpx.post(upstream.v1 + "/embeddings", json=body, timeout=30)
    assert r.content == direct.content  # the upstream's bytes, unchanged


def test_the_openai_client_gets_floats_and_base64_as_the_upstream_encodes_them(served, upstream):
    client = client_of(served)
    floats = client.embeddings.create(model="embed", input=["one", "three"], encoding_format="float")
    assert [d.embedding for d in floats.data] == [[0.3, 1.0, -0.25, 0.5], [0.5, 0.5, -0.25, 0.5]]
    assert floats.usage.prompt_tokens == 2
    b64 = client.embeddings.create(model="embed", input=["one", "three"])  # the SDK asks for base64, decodes it
    assert upstream.mock.received[-1]["encoding_format"] == "base64"
    assert [d.embedding for d in b64.data] == [list(struct.unpack("<4f", struct.pack("<4f", *d.embedding)))
                                              for d in floats.data]
    raw = httpx.post(served.v1 + "/embeddings", json={"model": "embed", "input": "one", "encoding_format": "base64"})
    assert struct.unpack("<4f", base64.b64decode(raw.json()["data"][0]["embedding"]))[0] == pytest.approx(0.3)
    tokens = client.embeddings.create(model="embed", input=[15339, 1917], encoding_format="float")
    assert upstream.mock.received[-1]["input"] == [15339, 1917] and tokens.usage.prompt_tokens == 2
    assert [(m.id, m.model_dump().get("kind")) for m in client.models.list()] == [("embed", "embedding")]


def test_a_different_upstream_name_renames_only_the_model(upstream):
    with gateway(upstream, name="small", model="text-embedding-3-small") as s:
        r = client_of(s).embeddings.create(model="small", input="hi", encoding_format="float", dimensions=2)
    assert upstream.mock.received[-1] == {"model": "text-embedding-3-small", "input": "hi",
                                          "encoding_format": "float", "dimensions": 2}
    assert r.model == "text-embedding-3-small"  # the answer is the upstream's own


@pytest.mark.parametrize(("behaviour", "error", "status"), [
    ("fail-500", openai.APIStatusError, 502), ("leak", openai.APIStatusError, 502),
    ("rate-429", openai.RateLimitError, 429)])
def test_upstream_failures_are_openai_shaped_and_never_name_the_upstream(upstream, behaviour, error, status):
    with gateway(upstream, name="embed", model=behaviour) as s, pytest.raises(error) as failed:
        client_of(s).embeddings.create(model="embed", input="x")
    assert failed.value.status_code == status
    body = failed.value.response.json()["error"]
    assert body["message"] and body["type"]
    host_port = upstream.v1.split("//")[1].split("/")[0]
    assert host_port not in failed.value.response.text and upstream.v1 not in failed.value.response.text
    if behaviour == "rate-429":
        assert failed.value.response.headers["retry-after"] == "7"


def test_an_unreachable_upstream_is_a_502_without_its_url():
    with serve_gateway({"embeddings": {"name": "embed", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"},
                        "server": {"access_log": False}}) as s:
        r = httpx.post(s.v1 + "/embeddings", json={"model": "embed", "input": "x"}, timeout=30)
    assert r.status_code == 502 and "127.0.0.1:9" not in r.text and r.json()["error"]["message"]


def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="embeddings.base_url"):
        FusionConfig.model_validate({"embeddings": {"name": "e", "backend": "openai"}})
    with pytest.raises(ValueError, match="backend 'openai'"):
        FusionConfig.model_validate({"embeddings": {"name": "e", "base_url": "http://127.0.0.1:1/v1"}})
    with pytest.raises(ValueError, match="context indexes"):
        FusionConfig.model_validate({"embeddings": {"name": "e", "backend": "openai", "base_url": "http://x/v1"},
                                     "context": {}})
