"""`Grammars.mask`: the whole batch's grammar masks in one llguidance fill and one apply, as row-by-row masking
would give, on the strided and inference-mode logits the decode loop has; rows without a constraint untouched."""

from __future__ import annotations

import llguidance.torch as lt
import torch

from reasonlite.models import load_tokenizer
from slm_fusion.backends.structured import Grammars, grammar_for

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["ok", "n"], "additionalProperties": False}


def test_batch_mask_equals_row_by_row_masks_and_leaves_free_rows_alone():
    tok = load_tokenizer("tiny-random-llama")
    vocab = len(tok)
    grammars = Grammars(tok, vocab)
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    grammars.check(grammar)
    reply = tok.encode('{"ok":true,"n":42}', add_special_tokens=False)
    a, b = grammars.constraint(grammar), grammars.constraint(grammar)
    b.accept(reply[0])  # the two constrained rows are in different grammar states
    one = lt.allocate_token_bitmask(1, vocab)
    for constraints in ([a, None, b], [a, b]):
        with torch.inference_mode():  # as the decode loop: the last position of a (rows, positions, vocab) output
            logits = torch.randn(len(constraints), 3, vocab)[:, -1, :]
        before = logits.clone()
        grammars.mask(logits, constraints)
        for row, c in enumerate(constraints):
            if c is None:
                assert torch.equal(logits[row], before[row])
                continue
            expected = before[row].clone()[None, :]
            lt.fill_next_token_bitmask(c.matcher, one, 0)
            lt.apply_token_bitmask_inplace(expected, one)
            assert torch.equal(logits[row], expected[0])
            assert 0 < int(torch.isfinite(logits[row]).sum()) < vocab  # some tokens allowed, most not
    assert grammars.mask_s > 0
