"""The ingress's tokenizer twin (slm_fusion.deploy_ray): a backend class with only its tokenizer loaded formats
chats and counts tokens exactly as the started backend does, so the reasoning layer and context packing in the Ray
ingress see the same prompts and token counts as under uvicorn. Needs no Ray."""

from __future__ import annotations

import asyncio

import pytest

from slm_fusion.backends.base import make_backend
from slm_fusion.config import LlamaCppModel, TransformersModel
from slm_fusion.deploy_ray import _tokenizer_twin

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 * 7? Think."}]
TEXT = "Tokens: ünïcode, numbers 12345 and <|im_end|> specials."


def _same_as_started(config) -> None:
    backend = make_backend(config)
    asyncio.run(backend.start())
    try:
        twin = _tokenizer_twin(config)
        assert twin.format_chat(MESSAGES) == backend.format_chat(MESSAGES)
        assert twin.count_tokens(TEXT) == backend.count_tokens(TEXT) > 5
        assert getattr(twin, "model", None) is None  # no weights in the ingress
    finally:
        asyncio.run(backend.aclose())


def test_transformers_twin_matches_the_backend():
    _same_as_started(TransformersModel(name="tiny", backend="transformers", model="tiny-random-llama",
                                       torch_threads=1))


@pytest.mark.integration
def test_llamacpp_twin_matches_the_backend():
    pytest.importorskip("llama_cpp")
    from reasonlite.models import smollm2_gguf

    _same_as_started(LlamaCppModel(name="g", backend="llamacpp", model=str(smollm2_gguf()), slots=1, n_ctx=256,
                                   n_threads=1))
