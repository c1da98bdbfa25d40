"""`llamacpp` backend: a GGUF model through llama-cpp-python, several requests decoded together in one context.

Chat prompts are formatted with the model's own Jinja chat template (the GGUF's `tokenizer.chat_template`, or the
config's `chat_template`) rendered by transformers' `render_jinja_template` — the same renderer as the tokenizer's
`apply_chat_template`; llama.cpp's own chat formatter renders some templates differently, so it is not used.

Decoding: llama-cpp-python's high-level `Llama` runs one sequence at a time, so the decode loop is written here on
its low-level API (the one llama.cpp's own server uses for its parallel slots): one context holds `slots` sequences,
each with its own `n_ctx` cells; one worker thread admits requests between decode steps, computes their prompts, and
decodes one token for every live sequence per `llama_decode` call. Each sequence has its own grammar (for
`response_format` and tool calls) and sampler chain (penalties, top-p, temperature, seeded distribution), stop
sequences and max_tokens. A token is drawn as `llama_sampler_sample` does it, with the grammar applied on its own
first: the logits after the grammar are the distribution `logprobs` report (as the transformers backend). A request's
n choices share one prompt computation (`llama_memory_seq_cp`). A finished sequence's slot keeps its prompt's cells;
a new prompt goes to the free slot holding its longest common prefix and only the rest is computed (llama.cpp
server's slot prompt cache, the same idea). As llama.cpp's server documents for its `cache_prompt`, a prompt computed
in two parts can give slightly different logits than computed at once; `prefix_cache: false` computes every prompt
whole.

Each sequence gets its own cell stream (`kv_unified = False`) although one shared pool would use less memory: with
a shared pool a sequence's cells land among other sequences' and greedy output then depends on what else is being
decoded (logits differed by up to 1.0 from the same request alone, SmolLM2 Q4_1); with separate streams a request's
tokens are the same alone or batched.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import functools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slm_fusion.backends.base import (
    Generation,
    GenerationRequest,
    ThreadBridge,
    TokenChunk,
    collect,
    find_stop,
    hold_back,
    requested_logprobs,
)
from slm_fusion.backends.prefix_cache import MIN_TOKENS, common_prefix
from slm_fusion.backends.structured import schema_key
from slm_fusion.config import LlamaCppModel
from slm_fusion.errors import InvalidRequest, Unavailable, UpstreamError

_STOP = object()  # worker shutdown sentinel


@dataclass
class _Job:
    req: GenerationRequest
    prompt_ids: list[int]
    max_tokens: int
    grammar: Any  # LlamaGrammar or None
    bridge: ThreadBridge
    top_logprobs: int | None = None  # log-probabilities asked for, with this many alternatives per token
    cancelled: bool = False
    completion_tokens: int = 0


@dataclass
class _Row:
    job: _Job
    choice: int
    seq: int
    grammar: Any  # llama_sampler of the job's grammar, or None
    sampler: Any  # llama_sampler chain drawing the token from what the grammar allows
    pos: int  # position of the next token
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    produced: int = 0
    text: str = ""
    emitted: int = 0
    pending: int | None = None  # the sampled token not yet fed back to the model
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # entries not yet sent with a chunk


class LlamaCppBackend:
    supports_response_format = True  # json_object / json_schema, as a llama.cpp grammar (GBNF) while decoding
    supports_logprobs = True  # chat `logprobs` / `top_logprobs`, from the distribution each token was drawn from
    supports_completion_logprobs = True  # text completions' `logprobs` too

    def __init__(self, config: LlamaCppModel) -> None:
        self.config = config
        self.llm = None
        self.chat_template: str | None = config.chat_template
        self._special: dict[str, str] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ctx = None
        self._vocab = None
        self._batch = None
        self._candidates: _Candidates | None = None
        self._carry: _Job | None = None
        # free slots (sequence ids), least recently used first, each with the prompt its cells still hold
        self._free: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.steps_run = 0  # observability for tests/benchmarks: decode steps, prefix reuse, where time goes
        self.prefix_hits = 0
        self.tokens_reused = 0
        self.forward_s = 0.0  # inside llama_decode
        self.busy_s = 0.0  # the worker's whole time with work (llama_decode + sampling + our loop)

    # ------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._worker, name=f"llamacpp-{self.config.name}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import Llama

        path = gguf_path(self.config.model)
        # The `Llama` object loads the weights and gives tokenizer, metadata and chat template; its own context is
        # made small, since decoding runs in the multi-sequence context created below.
        self.llm = Llama(model_path=str(path), n_ctx=64, n_threads=self.config.n_threads, verbose=False)
        self.chat_template = self.chat_template or self.llm.metadata.get("tokenizer.chat_template")
        for name, token_id in (("bos_token", self.llm.token_bos()), ("eos_token", self.llm.token_eos())):
            if token_id is not None and token_id >= 0:
                self._special[name] = self.llm.detokenize([token_id], special=True).decode("utf-8", "replace")
        model = self.llm._model.model  # the loaded llama_model pointer (llama-cpp-python has no public accessor)
        slots = self.config.slots
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.config.n_ctx * slots
        params.n_batch = params.n_ubatch = self.config.n_batch
        params.n_seq_max = slots
        params.kv_unified = False  # a stream of n_ctx cells per sequence (see the module docstring)
        # as `Llama`'s own context (and so llama-cpp-python's greedy output): llama.cpp's default AUTO turns flash
        # attention on, whose different summation order changes late greedy tokens
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if self.config.n_threads:
            params.n_threads = params.n_threads_batch = self.config.n_threads
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(max(self.config.n_batch, slots), 0, 1)
        self._free = OrderedDict((seq, ()) for seq in range(slots))
        self._candidates = _Candidates(llama_cpp.llama_vocab_n_tokens(self._vocab))

    async def aclose(self) -> None:
        if self._thread is not None:
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join, 60)
            self._thread = None
        if self.llm is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
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

    def _prepare(self, req: GenerationRequest) -> tuple[list[int], int, Any]:
        """(prompt tokens, max tokens, grammar or None), all checked before any work is queued."""
        if self.llm is None or self._thread is None:
            raise Unavailable(f"model '{self.config.name}' is not started")
        key = schema_key(req.extra.get("response_format"))
        grammar = _grammar(key) if key is not None else None  # a schema llama.cpp cannot compile: the client's 400
        ids = self._tokenize(self.format_chat(req.messages) if req.messages is not None else req.prompt)
        if not ids:  # an empty prompt: start from BOS as OpenAI's completions do
            ids = [self.llm.token_bos()]
        room = self.config.n_ctx - len(ids)
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {len(ids)} tokens; model '{self.config.name}' has n_ctx={self.config.n_ctx}",
                param="messages" if req.messages is not None else "prompt",
            )
        if req.n > self.config.slots:
            raise InvalidRequest(f"n={req.n} is more choices than model '{self.config.name}' decodes at once "
                                 f"(slots={self.config.slots}): lower n", param="n")
        return ids, min(req.max_tokens, room), grammar

    async def generate(self, req: GenerationRequest) -> list[Generation]:
        return await collect(self.stream(req), req.n, logprobs=requested_logprobs(req) is not None)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenChunk]:
        ids, max_tokens, grammar = self._prepare(req)
        job = _Job(req, ids, max_tokens, grammar, ThreadBridge(asyncio.get_running_loop()),
                   top_logprobs=requested_logprobs(req))
        self._inbox.put(job)
        pending = req.n
        try:
            while pending:
                item = await job.bridge.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    pending -= 1
                yield item
            yield TokenChunk(index=0, text="", usage=(len(ids), job.completion_tokens))
        finally:
            job.cancelled = True  # no-op when finished; otherwise the worker drops these rows at its next step

    # ------------------------------------------------------------------------------------------ worker
    def _worker(self) -> None:
        rows: list[_Row] = []
        stopping = False
        while True:
            if not rows:
                if stopping:
                    return
                job = self._carry or self._inbox.get()
                self._carry = None
                if job is _STOP:
                    return
                jobs = [job]
            else:
                jobs = []
            if not stopping:
                stopping = self._collect(jobs)
            began = time.perf_counter()
            try:
                for job in jobs:
                    rows += self._admit(job)
                rows = self._step(rows) if rows else rows
            except Exception as e:  # noqa: BLE001 — reported to every waiting request, the worker lives on
                err = UpstreamError(f"llama.cpp failed for model '{self.config.name}': {type(e).__name__}: {e}")
                waiting = {id(r.job): r.job for r in rows}
                waiting.update({id(j): j for j in jobs})
                for j in waiting.values():
                    j.bridge.put(err)
                self._reset(rows)
                rows = []
            self.busy_s += time.perf_counter() - began

    def _collect(self, jobs: list[_Job]) -> bool:
        """Take waiting jobs while their choices fit in the free slots; True when shutdown was asked."""
        free = len(self._free) - sum(j.req.n for j in jobs)
        while True:
            try:
                nxt = self._carry or self._inbox.get_nowait()
            except queue.Empty:
                return False
            self._carry = None
            if nxt is _STOP:
                return True
            if nxt.req.n > free:
                self._carry = nxt  # first in line once slots free up
                return False
            jobs.append(nxt)
            free -= nxt.req.n

    def _admit(self, job: _Job) -> list[_Row]:
        """Compute a job's prompt once, after the longest prefix a free slot still holds, and start its n rows
        (the other choices get a copy of the prompt's cells), each with its first token sampled."""
        import llama_cpp

        if job.cancelled:
            return []
        ids = job.prompt_ids
        first, reused = self._pick_slot(ids)
        llama_cpp.llama_memory_seq_rm(self._mem, first, reused, -1)  # what the slot held beyond the shared prefix
        self._decode(ids[reused:], first, reused)
        seqs = [first]
        for _ in range(job.req.n - 1):
            seq, _ = self._free.popitem(last=False)
            llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._mem, first, seq, -1, -1)
            seqs.append(seq)
        rows = [_Row(job, i, seq, self._grammar_sampler(job), self._sampler(job, i), pos=len(ids))
                for i, seq in enumerate(seqs)]
        return [r for r in rows if not self._sample(r, -1)]

    def _pick_slot(self, ids: list[int]) -> tuple[int, int]:
        """The free slot whose kept prompt shares the most leading tokens with `ids` (worth it from MIN_TOKENS on,
        one token always left to compute), else the least recently used one; and how many tokens it already has."""
        best, slot = 0, next(iter(self._free))
        for seq, held in self._free.items() if self.config.prefix_cache else ():
            n = common_prefix(held, ids[:-1])
            if n > best:
                best, slot = n, seq
        del self._free[slot]
        if best < MIN_TOKENS:
            return slot, 0
        self.prefix_hits += 1
        self.tokens_reused += best
        return slot, best

    def _decode(self, tokens: list[int], seq: int, start: int) -> None:
        """Feed `tokens` of one sequence from position `start`, in n_batch chunks; logits for the last one."""

        step = self.config.n_batch
        for at in range(0, len(tokens), step):
            chunk = tokens[at:at + step]
            last = at + len(chunk) == len(tokens)
            self._fill([(t, start + at + i, seq, last and i == len(chunk) - 1) for i, t in enumerate(chunk)])
            if self._llama_decode() != 0:
                raise RuntimeError("llama_decode failed while computing a prompt (context full?)")

    def _llama_decode(self) -> int:
        import llama_cpp

        began = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        self.forward_s += time.perf_counter() - began
        return status

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self._batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)

    def _step(self, rows: list[_Row]) -> list[_Row]:
        """One decode step: every live row's pending token in one batch, then each row samples its next."""

        self._fill([(r.pending, r.pos, r.seq, True) for r in rows])
        for r in rows:
            r.pos += 1
        self.steps_run += 1
        if self._llama_decode() != 0:
            raise RuntimeError("llama_decode failed (context full?)")
        return [r for i, r in enumerate(rows) if not self._sample(r, i)]

    def _sample(self, r: _Row, index: int) -> bool:
        """Sample the row's next token from the logits at batch `index` and deliver its text; True when finished
        (its sequence is then released)."""
        import llama_cpp

        job = r.job
        if job.cancelled:
            self._release(r)
            return True
        token, logprobs = self._draw(r, index)
        finish = None
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            finish = "stop"
            r.text += r.decoder.decode(b"", final=True)
        else:
            r.produced += 1
            job.completion_tokens += 1
            piece = self.llm.detokenize([token])
            if logprobs is not None:  # OpenAI lists the content tokens only
                r.logprobs.append(self._logprob_entry(logprobs, token, piece, job.top_logprobs))
            r.text += r.decoder.decode(piece)
            stops = job.req.stop
            cut = find_stop(r.text, r.emitted, stops) if stops else None
            if cut is not None:
                r.text, finish = r.text[:cut], "stop"
            elif r.produced >= job.max_tokens:
                finish = "length"
                r.text += r.decoder.decode(b"", final=True)
        if finish is not None:
            job.bridge.put(TokenChunk(index=r.choice, text=r.text[r.emitted:], finish_reason=finish,
                                      logprobs=_take_logprobs(r)))
            self._release(r)
            return True
        r.pending = token
        safe = len(r.text) - hold_back(job.req.stop)
        if safe > r.emitted:
            job.bridge.put(TokenChunk(index=r.choice, text=r.text[r.emitted:safe], logprobs=_take_logprobs(r)))
            r.emitted = safe
        return False

    def _draw(self, r: _Row, index: int) -> tuple[int, Any]:
        """The row's next token from the logits at batch `index`, as `llama_sampler_sample` draws it but with the
        grammar applied first on its own; and, when the job asks for logprobs, the log-softmax of the logits the
        grammar left (the distribution the token was drawn from), else None."""
        import llama_cpp

        cand = self._candidates
        cand.load(llama_cpp.llama_get_logits_ith(self._ctx, index))
        if r.grammar is not None:
            llama_cpp.llama_sampler_apply(r.grammar, cand.ref)
        logprobs = None
        if r.job.top_logprobs is not None:
            logits = cand.rows["logit"].astype(np.float64)  # a copy: the chain below may reorder the buffer
            top = logits.max()
            logprobs = logits - (top + np.log(np.exp(logits - top).sum()))
        llama_cpp.llama_sampler_apply(r.sampler, cand.ref)
        token = int(cand.array.data[cand.array.selected].id)  # `data` may point elsewhere after the chain
        if r.grammar is not None:
            llama_cpp.llama_sampler_accept(r.grammar, token)
        llama_cpp.llama_sampler_accept(r.sampler, token)
        return token, logprobs

    def _logprob_entry(self, logprobs: Any, token: int, piece: bytes, top: int) -> dict[str, Any]:
        """OpenAI's per-token entry: the token, its log-probability, its bytes, and the `top` most likely tokens."""
        def item(t: int, raw: bytes) -> dict[str, Any]:
            # a token the grammar forbids has -inf, which JSON cannot hold: OpenAI's own floor for it is -9999.0
            lp = max(float(logprobs[t]), -9999.0)
            return {"token": raw.decode("utf-8", "replace"), "logprob": lp, "bytes": list(raw)}

        best = np.argpartition(-logprobs, top)[:top] if 0 < top < len(logprobs) else np.arange(top)
        best = best[np.argsort(-logprobs[best], kind="stable")]
        return {**item(token, piece),
                "top_logprobs": [item(int(t), self.llm.detokenize([int(t)])) for t in best]}

    def _release(self, r: _Row) -> None:
        import llama_cpp

        prompt = r.job.prompt_ids
        llama_cpp.llama_memory_seq_rm(self._mem, r.seq, len(prompt), -1)  # the prompt's cells stay for reuse
        _free_samplers(r)
        self._free[r.seq] = tuple(prompt)

    def _reset(self, rows: list[_Row]) -> None:
        """After a failure: every slot empty and free, whatever state the failed step left the cells in."""
        import llama_cpp

        for r in rows:
            _free_samplers(r)
        llama_cpp.llama_memory_clear(self._mem, True)
        self._free = OrderedDict((seq, ()) for seq in range(self.config.slots))

    def _grammar_sampler(self, job: _Job) -> Any:
        import llama_cpp

        if job.grammar is None:
            return None
        return llama_cpp.llama_sampler_init_grammar(self._vocab, job.grammar._grammar.encode(), b"root")

    def _sampler(self, job: _Job, choice: int) -> Any:
        """The row's sampler chain after its grammar: penalties, top-p, temperature, seeded draw (or greedy)."""
        import llama_cpp

        req = job.req
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = functools.partial(llama_cpp.llama_sampler_chain_add, chain)
        presence, frequency = req.extra.get("presence_penalty") or 0.0, req.extra.get("frequency_penalty") or 0.0
        if presence or frequency:
            add(llama_cpp.llama_sampler_init_penalties(64, 1.0, float(frequency), float(presence)))
        if req.temperature < 1e-4:  # near-zero: greedy, as the transformers backend does
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if req.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(req.top_p, 1))
        add(llama_cpp.llama_sampler_init_temp(req.temperature))
        seed = (req.seed + choice) % (1 << 32) if req.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        add(llama_cpp.llama_sampler_init_dist(seed))  # llama.cpp seeds are uint32
        return chain


class _Candidates:
    """One reusable `llama_token_data_array` over a numpy buffer (the worker thread's only), loaded with a step's
    logits as `llama_sampler_sample` does, so the grammar and the chain can be applied to it separately."""

    def __init__(self, n_vocab: int) -> None:
        import llama_cpp

        self.n_vocab = n_vocab
        self.rows = np.zeros(n_vocab, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)],
                                                     align=True))
        self.ids = np.arange(n_vocab, dtype=np.intc)
        self.array = llama_cpp.llama_token_data_array(data=self.rows.ctypes.data_as(llama_cpp.llama_token_data_p),
                                                      size=n_vocab, selected=-1, sorted=False)
        self.ref = ctypes.byref(self.array)
        self._data = self.array.data

    def load(self, logits: Any) -> None:
        self.rows["id"] = self.ids
        self.rows["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self.rows["p"] = 0.0
        self.array.data, self.array.size, self.array.selected, self.array.sorted = self._data, self.n_vocab, -1, False


def _free_samplers(r: _Row) -> None:
    import llama_cpp

    if r.grammar is not None:
        llama_cpp.llama_sampler_free(r.grammar)
    llama_cpp.llama_sampler_free(r.sampler)


def _take_logprobs(r: _Row) -> dict[str, Any] | None:
    if r.job.top_logprobs is None or not r.logprobs:
        return None
    taken, r.logprobs = r.logprobs, []
    return {"content": taken}


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

