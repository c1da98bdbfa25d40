"""Per-model `context:` defaults (slm_fusion.context.settings): a model or virtual model that declares its vector
stores retrieves for every chat without the request asking; a request's `context` / `file_search` overrides field by
field. Through the official `openai` client against a real uvicorn; the store is filled by a first gateway on the same
SQLite file (the ids exist before the YAML that names them)."""

from __future__ import annotations

import io

import openai
import pytest
from gateway_helpers import serve, serve_gateway, upstream_model

from slm_fusion.backends.mock_upstream import MockUpstream
from slm_fusion.config import ConfigError, load_fusion_config

DOCS = {
    "prices.md": "Price list, autumn.\nThe Contour desk lamp costs 49.90 dollars.\n",
    "policy.txt": "Returns policy.\nItems can be returned within 30 days with a receipt. Sale items cannot be returned.\n",
    "stock.csv": "Stock report, week 48.\nWe have 12 Contour desk lamps in the warehouse.\n",
}
ASK = [{"role": "user", "content": "How much is the Contour desk lamp?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    mock = MockUpstream()
    db = tmp_path_factory.mktemp("ctx") / "context.db"
    with serve(mock) as upstream:
        base = {"embeddings": {}, "server": {"access_log": False}}
        with serve_gateway({**base, "models": [upstream_model("up", upstream.url)], "context": {"path": str(db)}}) as s:
            client = openai.OpenAI(base_url=s.v1, api_key="x", max_retries=0, timeout=120)
            ids = [client.files.create(file=(n, io.BytesIO(t.encode())), purpose="assistants").id
                   for n, t in DOCS.items()]
            vs = client.vector_stores.create(name="shop docs", file_ids=ids).id
        config = {**base, "context": {"path": str(db), "top_k": 4}, "models": [
            upstream_model("shop", upstream.url, context={"vector_store_ids": [vs], "top_k": 1}),
            upstream_model("picky", upstream.url, context={"vector_store_ids": [vs], "min_score": 0.99}),
            upstream_model("plain", upstream.url)],
            "virtual_models": {"auto": {"router": "rules", "default": "plain", "context": {"vector_store_ids": [vs]}},
                               "via-shop": {"router": "rules", "default": "shop"}}}
        with serve_gateway(config) as served:
            yield openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0, timeout=120), mock, vs


def _citations(reply) -> list[dict] | None:
    return (reply.model_dump()["choices"][0].get("slm_fusion") or {}).get("citations")


def test_a_model_with_declared_context_retrieves_without_being_asked(gateway):
    client, mock, _ = gateway
    reply = client.chat.completions.create(model="shop", messages=ASK)
    sent = mock.received[-1]
    assert sent["messages"][0]["role"] == "system" and "49.90" in sent["messages"][0]["content"]
    assert [c["filename"] for c in _citations(reply)] == ["prices.md"]  # the model's top_k: 1
    streamed = [c.model_dump() for c in client.chat.completions.create(model="shop", messages=ASK, stream=True)]
    assert [c["choices"][0]["slm_fusion"]["citations"] for c in streamed
            if c["choices"] and c["choices"][0].get("slm_fusion")] == [_citations(reply)]


def test_the_request_overrides_the_declared_context_field_by_field(gateway):
    client, mock, _ = gateway
    more = client.chat.completions.create(model="shop", messages=ASK, extra_body={"context": {"top_k": 3}})
    assert len(_citations(more)) == 3  # the request's top_k, the model's stores
    r = client.responses.create(model="shop", input="How much is the Contour desk lamp?",
                                tools=[{"type": "file_search", "vector_store_ids": [gateway[2]],
                                        "max_num_results": 2}])
    assert r.output[0].type == "file_search_call" and len(r.output[0].results) == 2
    picky = client.chat.completions.create(model="picky", messages=ASK)  # min_score 0.99 from the model: no source
    assert _citations(picky) == [] and mock.received[-1]["messages"] == ASK
    assert len(_citations(client.chat.completions.create(model="picky", messages=ASK,
                                                         extra_body={"context": {"min_score": 0.0}}))) == 3
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="shop", messages=ASK, extra_body={"context": {"top_k": 0}})
    assert e.value.body["param"] == "context" and "context.top_k" in e.value.body["message"]


def test_models_without_context_do_not_retrieve_and_virtual_models_may_declare_it(gateway):
    client, mock, _ = gateway
    plain = client.chat.completions.create(model="plain", messages=ASK)
    assert _citations(plain) is None and mock.received[-1]["messages"] == ASK
    auto = client.chat.completions.create(model="auto", messages=ASK)  # routed to plain; the virtual model retrieves
    assert len(_citations(auto)) == 3 and mock.received[-1]["messages"][0]["role"] == "system"  # gateway top_k 4
    via = client.chat.completions.create(model="via-shop", messages=ASK)  # no context of its own: shop's applies
    assert [c["filename"] for c in _citations(via)] == ["prices.md"]


def test_declared_context_is_checked_when_the_yaml_loads(tmp_path):
    yaml_file = tmp_path / "gw.yaml"
    yaml_file.write_text("models:\n  - {name: m, backend: openai, model: x, base_url: 'http://127.0.0.1:1/v1',\n"
                         "     context: {vector_store_ids: [vs_1]}}\n")
    with pytest.raises(ConfigError, match=r"models\.m\.context .*add `context: \{\}`"):
        load_fusion_config(yaml_file)
    yaml_file.write_text("embeddings: {}\ncontext: {}\nmodels:\n  - {name: m, backend: openai, model: x, "
                         "base_url: 'http://127.0.0.1:1/v1', context: {vector_store_id: [vs_1]}}\n")
    with pytest.raises(ConfigError, match="vector_store_id"):
        load_fusion_config(yaml_file)
    yaml_file.write_text("embeddings: {}\ncontext: {}\nmodels:\n  - {name: m, backend: openai, model: x, "
                         "base_url: 'http://127.0.0.1:1/v1'}\nvirtual_models:\n"
                         "  v: {router: rules, default: m, context: {vector_store_ids: [vs_1], top_k: 99}}\n")
    with pytest.raises(ConfigError, match="top_k"):
        load_fusion_config(yaml_file)
