"""Students that answer from context: the retail_docs generator (documents + lookup-and-arithmetic questions), the
`context` column of data files, `traces.context`, `eval.context_modes`, retrieval through the OpenAI vector-store
search API of a real gateway on 127.0.0.1, and the prompt a gateway-served student reads being the one it was trained
and evaluated with."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from reasonlite.answers import answers_match
from reasonlite.config import ConfigError, ContextConfig, build_config
from reasonlite.data.retail_docs import (
    CLASSIC_KINDS,
    DEFAULT_HELDOUT_KINDS,
    KINDS,
    make_world,
    retail_docs_corpus,
    retail_docs_splits,
    write_retail_docs,
)
from reasonlite.formats import SOURCES_PREAMBLE, build_messages, sources_message

SPLITS = retail_docs_splits(60, 40, seed=0, n_test_heldout=30)
SPLITS_ALL = retail_docs_splits(160, 60, seed=0, n_test_heldout=30, kinds="all")  # the 18 kinds, ~10 of each trained


def _numbers(text: str) -> set[Fraction]:
    return {Fraction(m.replace(",", "")) for m in re.findall(r"\d[\d,]*(?:\.\d+)?", text)}


def _givens(program: str) -> dict[str, Fraction]:
    """The `name = number` lines of a gold program (looked-up facts and the question's quantities)."""
    return {m.group(1): Fraction(m.group(2)) for m in re.finditer(r"^    (\w+) = (\d+(?:\.\d+)?)$", program, re.MULTILINE)}


# ---------------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_questions_and_documents_whatever_is_asked_for():
    again = retail_docs_splits(60, 40, seed=0, n_test_heldout=30)
    assert {k: [e.model_dump() for e in v] for k, v in again.items()} == \
        {k: [e.model_dump() for e in v] for k, v in SPLITS.items()}
    # the documents do not depend on how many questions are drawn: a vector store ingested once serves every run
    bigger = retail_docs_splits(200, 5, seed=0)
    corpus = {d.filename: d.text for d in retail_docs_corpus(0)}
    assert all(corpus[s.filename] == s.text for e in bigger["train"] + SPLITS["test"] for s in e.context)
    assert [e.question for e in bigger["train"][:60]] == [e.question for e in SPLITS["train"]]
    assert retail_docs_corpus(1) != retail_docs_corpus(0)
    assert len({d.filename for d in retail_docs_corpus(0)}) == len(retail_docs_corpus(0))


def test_test_products_stores_and_their_facts_never_appear_in_training():
    train_world, test_world = make_world("train"), make_world("test")
    test_names = {p.name for p in test_world.products} | {f"{s.name} store" for s in test_world.stores}
    assert not test_names & ({p.name for p in train_world.products} | {f"{s.name} store" for s in train_world.stores})
    seen_in_training = " ".join(e.question + " ".join(s.text for s in e.context) for e in SPLITS["train"])
    assert not [name for name in test_names if name in seen_in_training]
    train_files = {s.filename for e in SPLITS["train"] for s in e.context}
    for split in ("test", "test_heldout_kinds"):
        assert {e.metadata["world"] for e in SPLITS[split]} == {"test"}
        assert not {s.filename for e in SPLITS[split] for s in e.context} & train_files
        assert not {e.question for e in SPLITS[split]} & {e.question for e in SPLITS["train"]}


def test_the_heldout_kinds_are_never_trained_on():
    trained = {e.metadata["kind"] for e in SPLITS["train"]}
    assert trained == set(CLASSIC_KINDS) - set(DEFAULT_HELDOUT_KINDS) == {e.metadata["kind"] for e in SPLITS["test"]}
    trained_all = {e.metadata["kind"] for e in SPLITS_ALL["train"]}
    assert len(KINDS) == 18 and trained_all == set(KINDS) - set(DEFAULT_HELDOUT_KINDS)
    assert trained_all == {e.metadata["kind"] for e in SPLITS_ALL["test"]}
    assert {e.metadata["kind"] for e in SPLITS_ALL["test_heldout_kinds"]} == set(DEFAULT_HELDOUT_KINDS)
    # the classic kinds' questions are drawn as before: the wider set adds kinds, it does not change the first seven
    assert [e.question for e in SPLITS_ALL["test_heldout_kinds"]] == [e.question for e in SPLITS["test_heldout_kinds"]]
    picked = retail_docs_splits(12, 6, kinds=["units_cost", "stock_after_sale", "stock_value"])
    assert {e.metadata["kind"] for e in picked["train"]} == {"units_cost", "stock_after_sale"}
    with pytest.raises(ValueError, match="data.kinds: unknown"):
        retail_docs_splits(5, 5, kinds=["refund"])
    with pytest.raises(ValueError, match="data.kinds: 'every'"):
        retail_docs_splits(5, 5, kinds="every")
    assert {e.metadata["kind"] for e in SPLITS["test_heldout_kinds"]} == set(DEFAULT_HELDOUT_KINDS)
    custom = retail_docs_splits(10, 4, heldout_kinds=["bogo_cost"])
    assert "bogo_cost" not in {e.metadata["kind"] for e in custom["train"]}
    assert {e.metadata["kind"] for e in custom["test_heldout_kinds"]} == {"bogo_cost"}
    with pytest.raises(ValueError, match="data.heldout_kinds: unknown"):
        retail_docs_splits(5, 5, heldout_kinds=["refund"])


def test_a_kind_that_runs_out_of_new_questions_gives_its_turns_to_the_others():
    # stock_value has 64 distinct questions in the training world (products x stores it stocks); the others hundreds
    many = retail_docs_splits(300, 5, kinds=["stock_value", "units_cost"], heldout_kinds=["price_match"])["train"]
    kinds = [e.metadata["kind"] for e in many]
    assert len({e.question for e in many}) == 300
    assert kinds[:20] == ["stock_value", "units_cost"] * 10  # turns as before while both kinds have questions
    assert 50 <= kinds.count("stock_value") <= 64 and kinds.count("units_cost") >= 236
    with pytest.raises(RuntimeError, match="hold fewer than 100 distinct questions for the train split"):
        retail_docs_splits(100, 5, kinds=["stock_value"], heldout_kinds=["price_match"])
    # the member discount on one unit or a few: 480 training questions of every kind (30 each) can be drawn
    wide = retail_docs_splits(480, 5, kinds="all")["train"]
    assert sum(e.metadata["kind"] == "member_unit_price" for e in wide) == 30


def test_every_gold_program_runs_in_the_sandbox_to_the_gold_answer():
    from reasonlite.sandbox import execute_many

    examples = [e for splits in (SPLITS, SPLITS_ALL) for split in splits.values() for e in split]
    results = execute_many([e.program for e in examples])
    wrong = [(e.id, e.answer, r.value, r.error) for e, r in zip(examples, results)
             if not (r.ok and answers_match(str(r.value), e.answer))]
    assert not wrong
    assert all(e.rationale.endswith(f"The answer is {e.answer}.") for e in examples)


def test_the_gold_sources_hold_every_looked_up_number_and_the_question_holds_none_of_them():
    for e in (e for splits in (SPLITS, SPLITS_ALL) for split in splits.values() for e in split):
        in_context = _numbers(" ".join(s.text for s in e.context))
        in_question = _numbers(e.question)
        givens = _givens(e.program)
        assert e.metadata["lookups"] and set(e.metadata["lookups"]) <= set(givens), e.id
        for name in e.metadata["lookups"]:
            assert givens[name] in in_context, (e.id, name)
        # every other given is a quantity the question states; no given comes from nowhere
        assert all(v in in_question for k, v in givens.items() if k not in e.metadata["lookups"]), e.id
        looked_up = {givens[k] for k in e.metadata["lookups"]} - in_question
        assert looked_up, f"{e.id}: the question alone answers it"


def test_documents_are_short_single_chunk_markdown_files(tmp_path):
    from typer.testing import CliRunner

    from reasonlite.cli import app
    from reasonlite.models import load_tokenizer

    result = CliRunner().invoke(app, ["data", "retail-docs", str(tmp_path / "docs"), "--seed", "0"])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "docs").glob("*.md"))
    corpus = {d.filename: d.text for d in retail_docs_corpus(0)}
    assert sorted(f.name for f in files) == sorted(corpus)
    assert all(f.read_text() == corpus[f.name] + "\n" for f in files)
    assert f"{len(files)} documents" in result.output
    tokenizer = load_tokenizer("tiny-random-llama")  # SmolLM2's tokenizer
    lengths = [len(tokenizer(text)["input_ids"]) for text in corpus.values()]
    assert 30 <= min(lengths) and max(lengths) <= 170  # one chunk each in a vector store (800-token chunks)
    assert write_retail_docs(tmp_path / "again") and {p.name for p in (tmp_path / "again").iterdir()} == set(corpus)


def test_retail_docs_is_a_data_source_with_its_splits():
    from reasonlite.data.splits import load_splits

    cfg = build_config({"data": {"source": "retail_docs", "n_train": 7, "n_test": 3, "n_test_heldout_kinds": 2,
                                 "heldout_kinds": ["price_match"]}})
    splits = load_splits(cfg.data)
    assert {k: len(v) for k, v in splits.items()} == {"train": 7, "test": 3, "test_heldout_kinds": 2}
    assert all(e.context and e.domain == "retail" for v in splits.values() for e in v)
    assert {e.metadata["kind"] for e in splits["test_heldout_kinds"]} == {"price_match"}
    mixed = build_config({"data": {"n_train": 4, "n_test": 2, "mix": [{"source": "retail_docs", "weight": 0.5}]}})
    assert "retail_docs:test_heldout_kinds" in load_splits(mixed.data)


# ---------------------------------------------------------------------------------------------------------------
# Example.context from files
# ---------------------------------------------------------------------------------------------------------------

def test_a_context_column_becomes_the_examples_sources(tmp_path):
    from reasonlite.data.loaders import DataError, load_examples

    rows = [{"question": "How much is a mug?", "answer": "4", "context": "Mugs cost $4."},
            {"question": "Two mugs?", "answer": "8",
             "context": [{"filename": "prices.md", "text": "Mugs cost $4."}, {"filename": "a.md", "text": "x"}]},
            {"question": "No context?", "answer": "1"}]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_examples(path)
    assert [[(s.filename, s.text) for s in e.context or []] for e in got] == [
        [("context", "Mugs cost $4.")], [("prices.md", "Mugs cost $4."), ("a.md", "x")], []]
    assert got[2].context is None and "context" not in got[0].metadata
    # a mapped column, and a CSV cell holding the sources as JSON
    csv = tmp_path / "q.csv"
    csv.write_text('prompt,label,passage\n"Two mugs?",8,"[{""filename"": ""p.md"", ""text"": ""Mugs cost $4.""}]"\n')
    mapped = load_examples(csv, mapping={"question": "prompt", "answer": "label", "context": "passage"})
    assert mapped[0].context[0].filename == "p.md" and "passage" not in mapped[0].metadata
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1", "context": [{"name": "x"}]}) + "\n")
    with pytest.raises(DataError, match="field 'context'"):
        load_examples(bad, on_bad="fail")


# ---------------------------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------------------------

def test_context_knobs_are_checked_with_the_field_to_fix():
    with pytest.raises(ConfigError, match="eval.context_modes asks for 'retrieved' sources but context.vector_store"):
        build_config({"eval": {"context_modes": ["none", "retrieved"]}})
    with pytest.raises(ConfigError, match="traces.augment.k does not carry sources"):
        build_config({"traces": {"context": "gold", "augment": {"k": 1}}})
    with pytest.raises(ConfigError, match="distinct"):
        build_config({"eval": {"context_modes": ["gold", "gold"]}})
    with pytest.raises(ConfigError, match="traces.context"):
        build_config({"traces": {"context": "oracle"}})
    with pytest.raises(ConfigError, match=r"data.kinds: 'every' is neither all nor a list of retail_docs kinds"):
        build_config({"data": {"source": "retail_docs", "kinds": "every"}})
    assert build_config({"data": {"kinds": "all"}}).data.kinds == "all"
    cfg = build_config({"traces": {"context": "retrieved"}, "context": {"vector_store": "retail-docs"}})
    assert cfg.context.top_k == 3 and cfg.context.base_url.endswith("/v1")


def test_gold_mode_without_gold_context_names_the_knob():
    from reasonlite.context import ContextError, sources_for
    from reasonlite.data.retail_math import retail_math_splits

    with pytest.raises(ContextError, match="eval.context_modes: 'gold' needs each example's own context"):
        sources_for(retail_math_splits(2, 1)["test"], "gold", ContextConfig(), knob="eval.context_modes")
    assert sources_for(SPLITS["test"][:2], "none", ContextConfig()) == [None, None]


# ---------------------------------------------------------------------------------------------------------------
# traces.context: the teacher's and the student's prompts
# ---------------------------------------------------------------------------------------------------------------

def _traces_cfg(tmp_path, context: str):
    return build_config({"runs_dir": str(tmp_path / "runs"),
                         "data": {"source": "retail_docs", "n_train": 6, "n_test": 2, "n_test_heldout_kinds": 1},
                         "student": {"model": "tiny-random-llama", "format": "pal"},
                         "traces": {"context": context, "few_shot": 1}})


@pytest.mark.parametrize("context", ["gold", "none"])
def test_traces_context_puts_the_gold_sources_in_the_teacher_and_student_prompts(tmp_path, monkeypatch, context):
    from reasonlite.teachers.dataset import DatasetTeacher
    from reasonlite.traces import build, build_trace_set
    from reasonlite.traces.prompts import pick_exemplars, teacher_messages
    from reasonlite.train.formats_data import trace_examples

    asked: list = []

    class RecordingTeacher(DatasetTeacher):  # the gold answers, and a note of every prompt it was sent
        async def complete(self, prompts, samples, on_sample=None):
            asked.extend(prompts)
            return await super().complete(prompts, samples, on_sample)

    monkeypatch.setattr(build, "make_teacher", lambda cfg, style, seed: RecordingTeacher(style))
    cfg = _traces_cfg(tmp_path, context)
    ts = build_trace_set(cfg, tmp_path / "traces", show_progress=False)
    examples = retail_docs_splits(6, 2, n_test_heldout=1)["train"]
    assert ts.manifest["counts"]["correct"] == 6 == len(ts.traces)
    exemplars = pick_exemplars(1, "pal")
    gold = context == "gold"
    assert len(asked) == len(examples)
    for prompt, ex in zip(asked, examples):
        assert prompt.messages == teacher_messages(ex.question, "pal", exemplars, ex.context if gold else None)
        assert (prompt.messages[-2] == sources_message(ex.context)) is gold
    rows, _ = trace_examples(cfg, ts.traces)
    by_id = {e.id: e for e in examples}
    for row, trace in zip(rows, ts.traces):
        ex = by_id[trace.example_id]
        assert trace.context == (ex.context if gold else None)
        assert row.messages == build_messages(ex.question, "pal", sources=ex.context if gold else None)
        assert (row.messages[0]["content"].startswith(SOURCES_PREAMBLE + "\n\n[1] ")) is gold
    reloaded = build.TraceSet.load(tmp_path / "traces")
    assert [t.context for t in reloaded.traces] == [t.context for t in ts.traces]


def test_the_hash_of_a_config_changes_with_traces_context_only_when_set():
    from reasonlite.config import stage_hash

    base = build_config({"data": {"source": "retail_docs"}})
    gold = build_config({"data": {"source": "retail_docs"}, "traces": {"context": "gold"}})
    assert stage_hash(base, "traces") != stage_hash(gold, "traces")
    modes = build_config({"data": {"source": "retail_docs"}, "eval": {"context_modes": ["none", "gold"]}})
    assert stage_hash(base, "train") == stage_hash(modes, "train") and stage_hash(base, "eval") != stage_hash(modes, "eval")


# ---------------------------------------------------------------------------------------------------------------
# Against a real gateway: retrieval, eval modes, and the served prompt
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A gateway on 127.0.0.1 with a context store (all-MiniLM embeddings) and a tiny-random-llama 'student'
    exported as a PAL student; two vector stores: the whole retail_docs corpus, and one gold document alone."""
    import io

    import openai
    from gateway_helpers import TINY, gateway_of, serve_gateway

    from reasonlite.models import resolve_model_dir

    root = tmp_path_factory.mktemp("ctx-students")
    student = root / "student"
    student.mkdir()
    for f in resolve_model_dir("tiny-random-llama").iterdir():
        (student / f.name).symlink_to(f)
    (student / "reasonlite.json").write_text(json.dumps({"format": "pal"}))
    model = {**TINY, "name": "student", "model": str(student),
             "reasoning": {"student_prompt": True, "format": "pal", "answer_tokens": 6}}
    config = {"models": [model], "embeddings": {}, "context": {"path": str(root / "context.db")},
              "server": {"access_log": False}}
    docs = write_retail_docs(root / "docs")
    one_doc = next(e for e in SPLITS["test"] if len(e.context) == 1)
    with serve_gateway(config) as served:
        client = openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0, timeout=120)
        ids = {p.name: client.files.create(file=(p.name, io.BytesIO(p.read_bytes())), purpose="assistants").id
               for p in docs}
        client.vector_stores.create(name="retail-docs", file_ids=list(ids.values()))
        gold_only = client.vector_stores.create(name="gold-only", file_ids=[ids[one_doc.context[0].filename]])
        yield {"served": served, "client": client, "gateway": gateway_of(served), "student": student,
               "gold_only": gold_only.id, "one_doc": one_doc, "root": root}


def test_retrieved_sources_are_the_vector_store_search_results_and_are_searched_once(gateway, tmp_path):
    from reasonlite.context import ContextError, sources_for

    store, client = gateway["gateway"].context, gateway["client"]
    searches = []
    search = store.search
    store.search = lambda *a, **k: searches.append(a[1]) or search(*a, **k)  # count what reaches the store
    try:
        cfg = ContextConfig(base_url=gateway["served"].v1, vector_store="retail-docs", top_k=3)
        examples = SPLITS["test"][:8]
        got = sources_for(examples, "retrieved", cfg, runs_dir=tmp_path)
        assert searches == [e.question for e in examples]
        store_id = next(s.id for s in client.vector_stores.list() if s.name == "retail-docs")
        for e, sources in zip(examples, got):
            page = client.vector_stores.search(vector_store_id=store_id, query=e.question, max_num_results=3)
            assert [(s.filename, s.text) for s in sources] == [(h.filename, h.content[0].text) for h in page.data]
        catalog = [e for e, s in zip(examples, got) if e.metadata["kind"] == "case_cost"]
        assert catalog and all(e.context[0] in s for e, s in zip(examples, got) if e in catalog)
        searches.clear()
        assert sources_for(examples, "retrieved", cfg, runs_dir=tmp_path) == got and searches == []  # cached
        assert (tmp_path / "retrieval_cache.sqlite").exists()
    finally:
        store.search = search
    with pytest.raises(ContextError, match="context.vector_store: no vector store named 'nope'"):
        sources_for(examples, "retrieved", cfg.model_copy(update={"vector_store": "nope"}), runs_dir=tmp_path)
    from gateway_helpers import free_port

    with pytest.raises(ContextError, match="context.base_url: cannot reach"):
        sources_for(examples, "retrieved", cfg.model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}/v1"}),
                    runs_dir=tmp_path / "other")


def test_traces_context_retrieved_gives_the_teacher_and_student_the_searched_sources(gateway, tmp_path):
    from reasonlite.context import sources_for
    from reasonlite.traces import build_trace_set

    cfg = build_config({"runs_dir": str(tmp_path / "runs"),
                        "data": {"source": "retail_docs", "n_train": 4, "n_test": 1, "n_test_heldout_kinds": 1},
                        "student": {"model": "tiny-random-llama", "format": "pal"},
                        "traces": {"context": "retrieved"},
                        "context": {"base_url": gateway["served"].v1, "vector_store": "retail-docs", "top_k": 2}})
    ts = build_trace_set(cfg, tmp_path / "traces", show_progress=False)
    examples = retail_docs_splits(4, 1, n_test_heldout=1)["train"]
    want = sources_for(examples, "retrieved", cfg.context, cfg.runs_dir)
    assert [t.context for t in ts.traces] == want and all(len(s) == 2 for s in want)


def test_eval_reports_accuracy_per_split_per_context_mode(gateway, tmp_path):
    from reasonlite.pipeline import _eval_stage, _write_run_report

    cfg = build_config({"runs_dir": str(tmp_path / "runs"),
                        "data": {"source": "retail_docs", "n_train": 2, "n_test": 2, "n_test_heldout_kinds": 2},
                        "student": {"model": "tiny-random-llama", "format": "pal"},
                        "context": {"base_url": gateway["served"].v1, "vector_store": "retail-docs"},
                        "eval": {"splits": ["test", "test_heldout_kinds"], "context_modes": ["none", "gold", "retrieved"],
                                 "max_new_tokens": 8, "compare_base": False, "batch_size": 4}})
    out = tmp_path / "eval"
    out.mkdir()
    summary = _eval_stage(cfg, gateway["student"], out)
    assert summary["context_modes"] == ["none", "gold", "retrieved"]
    assert {mode: sorted(s) for mode, s in summary["by_context"].items()} == {
        m: ["test", "test_heldout_kinds"] for m in ("none", "gold", "retrieved")}
    assert summary["splits"] == summary["by_context"]["none"]  # the first mode is the headline
    for split in ("test", "test_heldout_kinds"):
        for mode, folder in (("none", f"student-{split}"), ("gold", f"student-{split}-context-gold"),
                             ("retrieved", f"student-{split}-context-retrieved")):
            result = json.loads((out / folder / "result.json").read_text())
            assert result["meta"]["context"] == mode and result["points"][0]["metrics"]["total"] == 2
    report = (out / "report.md").read_text()
    table = report.split("## Accuracy by context mode")[1]
    assert "| split | model | none | gold | retrieved |" in table
    assert len([line for line in table.splitlines() if line.startswith("| test")]) == 2
    _write_run_report(cfg, {k: v for k, v in summary.items() if k not in ("by_context", "context_modes")}, out)
    assert "context mode" not in (out / "report.md").read_text()  # a run without modes keeps its old report


def test_the_gateway_serves_a_student_the_prompt_it_was_trained_and_evaluated_on(gateway):
    """Retrieval's system message and the student prompt compose: the text that reaches the model behind the gateway
    (transformers backend, `reasoning.student_prompt`, a vector store holding the gold document) is the training
    prompt of `traces.context: gold` and the eval prompt of `eval.context_modes: [gold]` and `[retrieved]`, token for
    token; so the answer is the one `reasonlite eval` measures."""
    from reasonlite.context import sources_for
    from reasonlite.infer import Student
    from reasonlite.traces.verify import Trace
    from reasonlite.train.formats_data import prompt_ids, trace_examples

    ex, student_dir = gateway["one_doc"], gateway["student"]
    cfg = build_config({"student": {"model": "tiny-random-llama", "format": "pal"}, "traces": {"context": "gold"}})
    trace = Trace(id="t#0", example_id=ex.id, question=ex.question, style="pal", text="", program=ex.program,
                  label=ex.answer, context=ex.context)
    (row,), _ = trace_examples(cfg, [trace])
    student = Student(str(student_dir), answer_tokens=6)
    trained = student.tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
    assert student.prompt(ex.question, sources=ex.context) == trained  # eval, gold mode
    retrieved = sources_for([ex], "retrieved", ContextConfig(base_url=gateway["served"].v1,
                                                             vector_store=gateway["gold_only"], top_k=1),
                            runs_dir=gateway["root"] / "runs")[0]
    assert retrieved == ex.context and student.prompt(ex.question, sources=retrieved) == trained  # eval, retrieved

    backend = gateway["gateway"].handles["student"].backends[0]
    reached: list[str] = []
    generate = backend.generate

    async def spy(req):  # what the backend is asked to continue, then the real generation
        reached.append(req.prompt)
        return await generate(req)

    backend.generate = spy
    try:
        budget = 12
        resp = gateway["client"].chat.completions.create(
            model="student", messages=[{"role": "user", "content": ex.question}], max_tokens=64, temperature=0,
            extra_body={"reasoning_budget": budget,
                        "context": {"vector_store_ids": [gateway["gold_only"]], "top_k": 1}})
    finally:
        backend.generate = generate
    assert reached[0] == trained
    assert resp.usage.prompt_tokens == len(prompt_ids(student.tokenizer, row.messages))
    got = resp.model_dump()["choices"][0]
    assert [c["filename"] for c in got["slm_fusion"]["citations"]] == [ex.context[0].filename]
    want = student.solve(ex.question, budget=budget, sources=ex.context)
    assert got["slm_fusion"].get("program") == want.program and got["slm_fusion"].get("answer") == want.answer
    assert got["slm_fusion"]["reasoning_tokens"] == want.reasoning_tokens == budget


def test_the_gateways_retrieval_message_is_reasonlites_sources_message():
    from slm_fusion.context.retrieve import augment
    from slm_fusion.context.store import Hit

    hits = [Hit("f1", "a.md", 0.9, "Alpha.", {}, 1), Hit("f2", "b.md", 0.8, "Beta.", {}, 2),
            Hit("f3", "c.md", 0.7, "Alpha.", {}, 3)]  # a duplicate text is dropped
    messages, citations = augment([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
                                  hits, lambda text: len(text.split()), 1000)
    assert messages[1] == sources_message(hits[:2]) == build_messages("Q?", "pal", sources=hits[:2])[0]
    assert messages[1]["content"] == f"{SOURCES_PREAMBLE}\n\n[1] a.md\nAlpha.\n\n[2] b.md\nBeta."
    assert [c["filename"] for c in citations] == ["a.md", "b.md"]


def test_reasonlite_eval_writes_one_report_per_context_mode(tmp_path):
    from reasonlite.evaluate import eval_command

    result = eval_command("tiny-random-llama", data="retail_docs", fmt="pal", limit=1, out=tmp_path / "eval",
                          overrides=["eval.context_modes=[gold, none]", "eval.max_new_tokens=8",
                                     f"runs_dir={tmp_path / 'runs'}"])
    assert result.meta["context"] == "gold"  # the first mode's result is returned
    for mode in ("gold", "none"):
        saved = json.loads((tmp_path / "eval" / f"context-{mode}" / "result.json").read_text())
        assert saved["meta"]["context"] == mode and saved["meta"]["questions"] == 2  # test + test_heldout_kinds


def test_gold_retrieved_trains_on_the_gold_sources_among_the_retrievers_own_neighbours(gateway, tmp_path):
    """RAFT with hard distractors: each training question's gold sources plus what retrieval brings for it that is
    not gold, shuffled (seeded); the teacher and the student see exactly those."""
    from reasonlite.context import sources_for, with_retrieved
    from reasonlite.traces import build_trace_set

    cfg = build_config({"runs_dir": str(tmp_path / "runs"),
                        "data": {"source": "retail_docs", "n_train": 8, "n_test": 1, "n_test_heldout_kinds": 1},
                        "student": {"model": "tiny-random-llama", "format": "pal"},
                        "traces": {"context": "gold_retrieved"},
                        "context": {"base_url": gateway["served"].v1, "vector_store": "retail-docs", "top_k": 3}})
    examples = retail_docs_splits(8, 1, n_test_heldout=1)["train"]
    retrieved = sources_for(examples, "retrieved", cfg.context, cfg.runs_dir)
    mixed = sources_for(examples, "gold_retrieved", cfg.context, cfg.runs_dir, seed=0)
    for ex, found, sources in zip(examples, retrieved, mixed):
        texts = [s.text for s in sources]
        assert len(texts) == len(set(texts)) and all(g in sources for g in ex.context)  # every gold source, once
        assert {s.text for s in sources} == {s.text for s in [*ex.context, *found]}  # + the retriever's others
    assert any(sum(s not in ex.context for s in m) for ex, m in zip(examples, mixed))  # some distractor came along
    assert mixed == with_retrieved([list(e.context) for e in examples], retrieved, seed=0)  # seeded
    assert any(m != [*e.context, *(s for s in r if s not in e.context)] for e, r, m in zip(examples, retrieved, mixed))
    ts = build_trace_set(cfg, tmp_path / "traces", show_progress=False)
    assert [t.context for t in ts.traces] == mixed


def test_context_distractors_add_other_questions_documents_to_the_gold_ones_in_a_seeded_order(tmp_path):
    """RAFT: each training question reads its own sources among k others drawn from the other questions', as a
    retriever's neighbours; the gold ones are always there, the order is seeded, and at 0 nothing changes."""
    from reasonlite.context import with_distractors
    from reasonlite.traces import build_trace_set
    from reasonlite.train.formats_data import trace_examples

    examples = retail_docs_splits(6, 2, n_test_heldout=1)["train"]
    golds = [list(e.context) for e in examples]
    mixed = with_distractors([*golds, None], 2, seed=0)
    assert mixed[-1] is None and mixed[:-1] == with_distractors(golds, 2, seed=0)[:len(golds)]
    pool = {s.filename for g in golds for s in g}
    for gold, sources in zip(golds, mixed):
        names = [s.filename for s in sources]
        assert len(names) == len(set(names)) == len(gold) + 2 and {s.filename for s in gold} <= set(names) <= pool
    assert any([s.filename for s in m][: len(g)] != [s.filename for s in g] for g, m in zip(golds, mixed))
    with pytest.raises(ConfigError, match="traces.context_distractors adds documents .* set traces.context: gold \\(or gold_retrieved\\)"):
        build_config({"traces": {"context_distractors": 2}})
    cfg = _traces_cfg(tmp_path, "gold").model_copy(deep=True)
    cfg.traces.context_distractors = 2
    ts = build_trace_set(cfg, tmp_path / "traces", show_progress=False)
    by_id = {e.id: e for e in examples}
    rows, _ = trace_examples(cfg, ts.traces)
    for row, trace in zip(rows, ts.traces):
        gold = by_id[trace.example_id].context
        assert len(trace.context) == len(gold) + 2 and all(s in trace.context for s in gold)
        assert row.messages == build_messages(by_id[trace.example_id].question, "pal", sources=trace.context)
