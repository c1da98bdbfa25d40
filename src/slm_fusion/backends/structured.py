"""Structured outputs on local models: OpenAI's `response_format` enforced token by token.

`{"type": "json_schema", "json_schema": {"schema": ...}}` and `{"type": "json_object"}` become a grammar with
llguidance (the constrained-decoding engine llama.cpp and vLLM use). At every decoding step the grammar gives the set
of tokens that keep the output valid; the backend masks the logits with it before sampling, so the model can only
write JSON the schema accepts, and the row ends when the grammar can go no further. Whitespace is compact: the tokens
go to content, not to indentation a small model would happily fill.

    grammar = grammar_for(req.extra.get("response_format"))      # None for text; InvalidRequest for a bad schema
    grammars = Grammars(hf_tokenizer, vocab_size)                 # once per backend (building it takes ~1 s)
    grammars.check(grammar)                                       # a schema llguidance cannot use: 400, up front
    row = grammars.constraint(grammar)                            # one per generated choice
    grammars.mask(logits, [row, None, ...]); ...; done = row.accept(token)   # per step, the whole batch at once

Per step the masks of all constrained rows are computed by llguidance's thread pool into one reused bitmask and
applied in one call (llguidance's compiled kernel), not row by row in Python: per constrained row and token that
takes ~0.2 ms instead of ~0.45 ms (SmolLM2's 49k vocabulary, batch of 8, one CPU thread; most of it was the
one-row apply, ~0.13 ms each).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from typing import Any

from slm_fusion.errors import InvalidRequest

__all__ = ["Constraint", "Grammars", "grammar_for", "json_schema_of", "schema_key"]

_COMPACT = {"whitespace_flexible": False}


def json_schema_of(response_format: Any) -> dict | None:
    """The JSON Schema an OpenAI `response_format` asks for (None: plain text); a malformed one is a 400."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidRequest("response_format must be an object such as {\"type\": \"json_object\"}",
                             param="response_format")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema.schema is required: a JSON Schema object, as in "
                                 "{\"type\": \"json_schema\", \"json_schema\": {\"name\": \"x\", \"schema\": {...}}}",
                                 param="response_format")
        return schema
    raise InvalidRequest(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                         param="response_format")


def schema_key(response_format: Any) -> str | None:
    """The requested schema as canonical JSON (None: plain text): what compiled grammars are cached by."""
    schema = json_schema_of(response_format)
    return None if schema is None else json.dumps(schema, sort_keys=True)


def grammar_for(response_format: Any) -> str | None:
    """The llguidance grammar for an OpenAI `response_format` (None: plain text); compiled once per schema."""
    key = schema_key(response_format)
    return None if key is None else _compiled(key)


@functools.lru_cache(maxsize=256)  # clients repeat their schemas; bounded, since any client can send new ones
def _compiled(schema_json: str) -> str:
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(schema_json, defaults=_COMPACT)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"response_format.json_schema.schema cannot be enforced: {e}",
                             param="response_format") from None


class Constraint:
    """The grammar state of one generated choice."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; True when the grammar is complete and nothing more may follow."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding: token {token} refused ({self.matcher.get_error()})")
        return self.matcher.is_stopped()


class Grammars:
    """The model's tokenizer as llguidance sees it, built once per backend, lazily (not every model needs it)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self._vocab_size = vocab_size
        self._ll: Any = None
        self._lock = threading.Lock()
        self._checked: set[str] = set()
        self._executor: Any = None  # llguidance's mask thread pool, made with the tokenizer
        self._bitmask: Any = None  # (rows, vocab/32) int32, grown to the largest batch seen and reused
        self.mask_s = 0.0  # observability for benchmarks: time spent computing and applying masks

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size)
                self._executor = llguidance.LLExecutor()
                _compile_apply_kernel(self._vocab_size)
            return self._ll

    def check(self, grammar: str) -> None:
        """A grammar this model's tokenizer cannot follow is the client's 400 (each grammar checked once)."""
        if grammar in self._checked:
            return
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self._tokenizer())
        if error:
            raise InvalidRequest(f"response_format cannot be enforced on this model: {error}",
                                 param="response_format")
        if len(self._checked) >= 256:  # bounded like the compiled grammars
            self._checked.clear()
        self._checked.add(grammar)

    def constraint(self, grammar: str) -> Constraint:
        from llguidance import LLMatcher

        return Constraint(LLMatcher(self._tokenizer(), grammar))

    def mask(self, logits: Any, constraints: list[Constraint | None]) -> None:
        """Forbid (in place) in each row of `logits` (batch, vocab) every token its constraint refuses; rows whose
        constraint is None are left as they are. Called by the decode thread only (the bitmask is reused)."""
        import llguidance.torch as lt
        import torch

        rows = [b for b, c in enumerate(constraints) if c is not None]
        if not rows:
            return
        began = time.perf_counter()
        if self._bitmask is None or self._bitmask.shape[0] < len(rows):
            self._bitmask = lt.allocate_token_bitmask(len(rows), self._tokenizer().vocab_size)
        bitmask = self._bitmask[:len(rows)]
        lt.fill_next_token_bitmask_par(self._executor, [(constraints[b].matcher, k) for k, b in enumerate(rows)],
                                       bitmask)
        bitmask = bitmask.to(logits.device)
        # The kernel is compiled for contiguous (rows, vocab) tensors: a strided view (the last position of a
        # prefill's logits) would make torch.compile recompile for every new stride, ~30 ms a row each time.
        with torch.inference_mode():
            if len(rows) == len(constraints) and logits.is_contiguous():
                lt.apply_token_bitmask_inplace(logits, bitmask)
            else:  # the constrained rows, gathered (contiguous) and written back
                picked = logits[rows]
                lt.apply_token_bitmask_inplace(picked, bitmask)
                logits[rows] = picked
        self.mask_s += time.perf_counter() - began


def _compile_apply_kernel(vocab_size: int) -> None:
    """llguidance's apply kernel is `torch.compile`d on first use, once for one row and once for any other batch
    size (a second or more each): done here, with the tokenizer (off the decode loop), not in the first batches."""
    import llguidance.torch as lt
    import torch

    for rows in (1, 2):
        bitmask = lt.allocate_token_bitmask(rows, vocab_size)  # a plain tensor, as `Grammars.mask`'s
        with torch.inference_mode():  # logits as the decode loop's (another dispatch key would be another compile)
            lt.apply_token_bitmask_inplace(torch.zeros(rows, vocab_size), bitmask)

