"""The one JSON Lines reader: file lines only (never U+2028 inside a string), blank lines skipped, bad lines named."""

import json

import pytest

from reasonlite.jsonl import JsonlError, iter_jsonl


def test_a_line_separator_inside_a_string_does_not_split_the_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"question": "first\u2028second\u0085third"}, {"question": "next"}]
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, rows[0]), (3, rows[1])]


def test_a_bad_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"rows\.jsonl:2: invalid JSON \(Expecting value at column \d+\)"):
        list(iter_jsonl(path))
    got = list(iter_jsonl(path, errors="yield"))
    assert got[0] == (1, {"a": 1}) and got[1][0] == 2 and isinstance(got[1][1], JsonlError)


def test_the_readers_share_it(tmp_path):
    """Routing files and few-shot files report a broken line the same way."""
    from reasonlite.traces.prompts import load_exemplars
    from slm_fusion.routing.base import RoutingConfigError, load_labelled

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "model": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(RoutingConfigError, match=r"bad\.jsonl:2: invalid JSON"):
        load_labelled(bad)
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"question": "q\u2028?", "answer": "1", "program": "def solution():\\n    return 1"}\n{\n',
                     encoding="utf-8")
    with pytest.raises(ValueError, match=r"traces\.few_shot_path .*shots\.jsonl:2: invalid JSON"):
        load_exemplars(shots, "pal")
