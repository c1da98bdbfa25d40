"""`llamacpp` backend: a GGUF model through llama-cpp-python.

Chat prompts are formatted with the model's own Jinja chat template (the GGUF's `tokenizer.chat_template`, or the
config's `chat_template`) rendered by transformers' `render_jinja_template` — the same renderer as the tokenizer's
`apply_chat_template` — then continued with `Llama.create_completion(prompt=...)`. llama.cpp's own chat formatter
renders some templates differently, so it is not used. A `Llama` is not thread-safe: each call runs in a worker
thread under a lock.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from slm_fusion.backends.base import Generation, GenerationRequest, ThreadBridge, TokenChunk
from slm_fusion.backends.structured import schema_key
from slm_fusion.config import LlamaCppModel
from slm_fusion.errors import InvalidRequest, Unavailable, UpstreamError

_END = object()


class LlamaCppBackend:
    supports_response_format = True  # json_object / json_schema, as a llama.cpp grammar (GBNF) while decoding

    def __init__(self, config: LlamaCppModel) -> None:
        self.config = config
        self.llm = None
        self.chat_template: str | None = config.chat_template
        self._special: dict[str, str] = {}
        self._lock = threading.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from llama_cpp import Llama

        path = gguf_path(self.config.model)
        self.llm = Llama(model_path=str(path), n_ctx=self.config.n_ctx, n_threads=self.config.n_threads,
                         n_batch=self.config.n_batch, verbose=False)
        self.chat_template = self.chat_template or self.llm.metadata.get("tokenizer.chat_template")
        for name, token_id in (("bos_token", self.llm.token_bos()), ("eos_token", self.llm.token_eos())):
            if token_id is not None and token_id >= 0:
                self._special[name] = self.llm.detokenize([token_id], special=True).decode("utf-8", "replace")

    async def aclose(self) -> None:
        if self.llm is not None:
            with self._lock:
                self.llm.close()
            self.llm = None

    # ----------------------------------------------------------------------------------------------- API
    def format_chat(self, messages: list[dict[str, Any]]) -> str:
        if not self.chat_template:
            raise InvalidRequest(
                f"model '{self.config.name}' has no chat template: use /v1/completions or set `chat_template`",
                param="messages",
            )
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                            add_generation_prompt=True, **self._special)
        return rendered[0]

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    def _tokenize(self, text: str) -> list[int]:
        # add_bos follows the GGUF's own `add_bos_token` flag, as create_completion does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.llm.metadata.get(
            "tokenizer.ggml.add_bos_token", "true") == "true", special=True)

    def _prepare(self, req: GenerationRequest) -> tuple[str | list[int], int, int, Any]:
        """(prompt, prompt tokens, max tokens, grammar or None), all checked before any work is queued."""
        if self.llm is None:
            raise Unavailable(f"model '{self.config.name}' is not started")
        key = schema_key(req.extra.get("response_format"))
        grammar = _grammar(key) if key is not None else None  # a schema llama.cpp cannot compile: the client's 400
        prompt: str | list[int] = self.format_chat(req.messages) if req.messages is not None else req.prompt
        prompt_tokens = len(self._tokenize(prompt))
        if prompt_tokens == 0:  # an empty prompt: start from BOS as OpenAI's completions do
            prompt, prompt_tokens = [self.llm.token_bos()], 1
        room = self.config.n_ctx - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {prompt_tokens} tokens; model '{self.config.name}' has n_ctx={self.config.n_ctx}",
                param="messages" if req.messages is not None else "prompt",
            )
        return prompt, prompt_tokens, min(req.max_tokens, room), grammar

    def _kwargs(self, req: GenerationRequest, max_tokens: int, choice: int, grammar: Any) -> dict[str, Any]:
        temperature = req.temperature if req.temperature >= 1e-4 else 0.0  # near-zero: greedy, as transformers'
        kw: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": req.top_p,
                              "stop": req.stop or None, "grammar": grammar}
        if req.seed is not None:
            kw["seed"] = (req.seed + choice) % (1 << 32)  # llama.cpp seeds are uint32
        for name in ("presence_penalty", "frequency_penalty"):
            if name in req.extra:
                kw[name] = req.extra[name]
        return kw

    async def generate(self, req: GenerationRequest) -> list[Generation]:
        prompt, prompt_tokens, max_tokens, grammar = self._prepare(req)

        def run() -> list[Generation]:
            out = []
            with self._lock:
                for i in range(req.n):
                    res = self.llm.create_completion(prompt=prompt, **self._kwargs(req, max_tokens, i, grammar))
                    choice = res["choices"][0]
                    out.append(Generation(text=choice["text"], finish_reason=choice["finish_reason"] or "stop",
                                          prompt_tokens=prompt_tokens,
                                          completion_tokens=res["usage"]["completion_tokens"]))
            return out

        try:
            return await asyncio.to_thread(run)
        except Exception as e:
            raise UpstreamError(f"llama.cpp failed for model '{self.config.name}': {e}") from e

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenChunk]:
        prompt, prompt_tokens, max_tokens, grammar = self._prepare(req)
        bridge = ThreadBridge(asyncio.get_running_loop())
        cancelled = threading.Event()

        def run() -> None:
            try:
                with self._lock:
                    for i in range(req.n):
                        texts = []
                        for part in self.llm.create_completion(prompt=prompt, stream=True,
                                                               **self._kwargs(req, max_tokens, i, grammar)):
                            if cancelled.is_set():
                                return
                            c = part["choices"][0]
                            texts.append(c["text"])
                            bridge.put(TokenChunk(index=i, text=c["text"], finish_reason=c["finish_reason"]))
                        bridge.put(len(self._tokenize("".join(texts))) - len(self._tokenize("")))
                bridge.put(_END)
            except Exception as e:  # noqa: BLE001 — delivered to the request, which raises it
                bridge.put(UpstreamError(f"llama.cpp failed for model '{self.config.name}': {e}"))

        task = asyncio.create_task(asyncio.to_thread(run))
        completion = 0
        try:
            while True:
                item = await bridge.queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, int):
                    completion += item
                    continue
                yield item
            yield TokenChunk(index=0, text="", usage=(prompt_tokens, completion))
        finally:
            cancelled.set()
            await asyncio.shield(task)


GGUF_ALIASES = {"smollm2-135m-instruct": "smollm2_gguf", "gemma3-270m": "gemma3_gguf"}


def gguf_path(model: str) -> Path:
    """A .gguf path, or an alias of a GGUF shipped in a model wheel (located by reasonlite.models)."""
    if model in GGUF_ALIASES:
        import reasonlite.models

        return Path(getattr(reasonlite.models, GGUF_ALIASES[model])())
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file {path} does not exist: give a .gguf path or one of {sorted(GGUF_ALIASES)}"
        )
    return path


@functools.lru_cache(maxsize=256)  # one compile per schema; bounded, since any client can send new ones
def _grammar(schema_json: str) -> Any:
    """`response_format`'s schema as llama.cpp's own JSON-schema grammar (GBNF)."""
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(schema_json, verbose=False)
    except Exception as e:  # noqa: BLE001 - llama.cpp's converter raises plain Exceptions for bad schemas
        raise InvalidRequest(f"response_format.json_schema.schema cannot be enforced by llama.cpp: {e}",
                             param="response_format") from None
