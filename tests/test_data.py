"""`Example` and the file loaders: jsonl, json, csv, parquet/arrow/save_to_disk, field mapping, bad rows."""

import json

import pytest

from reasonlite.data import DataError, Example, load_examples, load_examples_with_report


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_example_defaults_and_metadata_not_shared():
    a = Example(id="1", question="q?")
    b = Example(id="2", question="q?")
    a.metadata["x"] = 1
    assert b.metadata == {}
    assert (a.answer, a.rationale, a.program, a.domain) == (None, None, None, "general")


def test_jsonl_with_mapping_normalises_answers_and_keeps_extra_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"uid": "a", "prompt": "What is 2+2?", "label": "$4.00", "topic": "arith"},
        {"uid": "b", "prompt": "Half of 5?", "label": 2.5},
    ])
    examples = load_examples(path, mapping={"id": "uid", "question": "prompt", "answer": "label"}, domain="toy")
    assert [e.id for e in examples] == ["a", "b"]
    assert [e.answer for e in examples] == ["4", "2.5"]
    assert examples[0].metadata == {"topic": "arith"}
    assert {e.domain for e in examples} == {"toy"}


def test_jsonl_bad_rows_are_skipped_and_reported_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "ok 1", "answer": "3"},
        "{not json",
        {"answer": "5"},
        {"question": "non numeric", "answer": "blue"},
        {"question": "ok 2", "answer": "1,000"},
    ])
    examples, report = load_examples_with_report(path, require_numeric_answer=True)
    assert [e.question for e in examples] == ["ok 1", "ok 2"]
    assert examples[1].answer == "1000"
    assert (report.rows, report.loaded, report.skipped) == (5, 2, 3)
    assert [(b.location, b.field) for b in report.bad] == [
        (f"{path}:2", "<json>"), (f"{path}:3", "question"), (f"{path}:4", "answer")]
    # without the numeric requirement the non-numeric answer is kept as text
    assert len(load_examples(path)) == 3


def test_on_bad_fail_names_file_line_field_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "ok", "answer": "1"}, {"prompt": "x", "answer": "2"}])
    with pytest.raises(DataError) as err:
        load_examples(path, on_bad="fail")
    message = str(err.value)
    assert f"{path}:2" in message and "'question'" in message and "fix:" in message and "mapping" in message


def test_csv_line_numbers_count_multiline_quoted_records(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,answer\n"two\nlines",4\n,5\n"fine",blue\n', encoding="utf-8")
    examples, report = load_examples_with_report(path, require_numeric_answer=True)
    assert [e.answer for e in examples] == ["4"]
    assert examples[0].question == "two\nlines"
    assert [b.location for b in report.bad] == [f"{path}:4", f"{path}:5"]


def test_json_list_and_duplicate_ids(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "x", "question": "a"}, {"id": "x", "question": "b"}]), encoding="utf-8")
    examples, report = load_examples_with_report(path)
    assert [e.question for e in examples] == ["a"]
    assert report.bad[0].field == "id"


def test_hf_parquet_arrow_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["1+1?", "3*3?"], "label": ["2", "9"]})
    mapping = {"question": "prompt", "answer": "label"}
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved", arrow_file):
        assert [e.answer for e in load_examples(source, mapping=mapping)] == ["2", "9"], source
    assert len(load_examples(tmp_path / "dict", mapping=mapping, split="test")) == 1
    with pytest.raises(DataError, match=r"d.parquet:row 0: field .answer."):
        load_examples(tmp_path / "d.parquet", mapping={"question": "prompt", "answer": "nope"},
                      require_numeric_answer=True, on_bad="fail")


def test_clear_errors_for_missing_file_unknown_mapping_and_all_bad(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "x"}])
    with pytest.raises(DataError, match="unknown field"):
        load_examples(path, mapping={"questoin": "q"})
    with pytest.raises(DataError, match="all 1 rows are bad"):
        load_examples(path)
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported"):
        load_examples(tmp_path / "d.xlsx")



# ---------------------------------------------------------------------------------------------- templates and mixes
def test_mapping_template_builds_a_field_from_several_columns(tmp_path):
    path = tmp_path / "svamp.jsonl"
    path.write_text(json.dumps({"Body": "Ann has 3 apples.", "Question": "How many?", "Answer": 3.0}) + "\n")
    [ex] = load_examples(path, mapping={"question": "{Body} {Question}", "answer": "Answer"})
    assert ex.question == "Ann has 3 apples. How many?" and ex.answer == "3"
    with pytest.raises(DataError, match=r"template '\{Body\} \{Missing\}' names column 'Missing'"):
        load_examples(path, mapping={"question": "{Body} {Missing}", "answer": "Answer"}, on_bad="fail")


def test_eval_data_file_honours_the_field_mapping(tmp_path):
    from reasonlite.evaluate import load_eval_data

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"Body": f"Bo has {i} pens.", "Q": "How many?", "Answer": i}) + "\n"
                            for i in range(3)))
    examples = load_eval_data(str(path), field_mapping={"question": "{Body} {Q}", "answer": "Answer"})
    assert [e.question for e in examples] == [f"Bo has {i} pens. How many?" for i in range(3)]
    with pytest.raises(DataError, match="column 'question' is missing"):
        load_eval_data(str(path))


def test_data_mix_trains_on_weighted_sources_and_reports_each_split():
    from reasonlite.config import DataConfig
    from reasonlite.data.splits import load_splits

    cfg = DataConfig(source="retail_math", n_train=40, n_test=5,
                     mix=[{"source": "retail_math", "name": "other", "weight": 0.5, "n_test": 3}])
    splits = load_splits(cfg)
    assert len(splits["train"]) == 40 + 20
    assert len(splits["test"]) == 5 and len(splits["other:test"]) == 3
    eval_only = load_splits(DataConfig(source="retail_math", n_train=40, n_test=5,
                                       mix=[{"source": "retail_math", "name": "guard", "weight": 0.0}]))
    assert len(eval_only["train"]) == 40 and "guard:test" in eval_only
    with pytest.raises(ValueError, match="two sources are named 'x'"):
        load_splits(DataConfig(mix=[{"source": "retail_math", "name": "x"}, {"source": "retail_math", "name": "x"}]))
