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
    row.mask(logits_row); ...; done = row.accept(token)
"""

from __future__ import annotations

import functools
import json
import threading
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

    __slots__ = ("_bitmask", "_matcher")

    def __init__(self, matcher: Any, bitmask: Any) -> None:
        self._matcher = matcher
        self._bitmask = bitmask

    def mask(self, logits_row: Any) -> None:
        """Forbid (in place) every token that would make the output invalid."""
        import llguidance.torch as lt

        lt.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        lt.apply_token_bitmask_inplace(logits_row[None, :], self._bitmask.to(logits_row.device))

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; True when the grammar is complete and nothing more may follow."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding: token {token} refused ({self._matcher.get_error()})")
        return self._matcher.is_stopped()


class Grammars:
    """The model's tokenizer as llguidance sees it, built once per backend, lazily (not every model needs it)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self._vocab_size = vocab_size
        self._ll: Any = None
        self._lock = threading.Lock()
        self._checked: set[str] = set()

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size)
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
        import llguidance.torch as lt
        from llguidance import LLMatcher

        tok = self._tokenizer()
        return Constraint(LLMatcher(tok, grammar), lt.allocate_token_bitmask(1, tok.vocab_size))
