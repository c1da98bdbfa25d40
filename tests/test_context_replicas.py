"""Two gateway replicas on one PostgreSQL + pgvector context store (`context.url`), through the official `openai`
client against two real uvicorns on 127.0.0.1: what one replica ingests the other searches and answers from, a
file batch started on one is seen (and its files listed) on the other, and a delete on either is seen by both; the
`slm-fusion store` commands work on the same database."""

from __future__ import annotations

import io

import openai
import pytest
from gateway_helpers import serve, serve_gateway, upstream_model
from pg_server import start_pgvector_server_or_skip
from typer.testing import CliRunner

from slm_fusion.backends.mock_upstream import MockUpstream
from slm_fusion.cli import app as cli_app


@pytest.fixture(scope="module")
def replicas():
    pg = start_pgvector_server_or_skip()
    try:
        with serve(MockUpstream()) as upstream:
            config = {"models": [upstream_model("up", upstream.url)], "embeddings": {}, "context": {"url": pg.url},
                      "server": {"access_log": False}}
            with serve_gateway(config) as a, serve_gateway(config) as b:
                yield *[openai.OpenAI(base_url=s.v1, api_key="x", max_retries=0, timeout=120) for s in (a, b)], pg.url
    finally:
        pg.stop()


def test_what_one_replica_ingests_the_other_serves(replicas):
    a, b, _ = replicas
    ids = [a.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants").id for name, text in (
        ("prices.md", "The Contour desk lamp costs 49.90 dollars."),
        ("stock.csv", "We have 12 Contour desk lamps in the warehouse."))]
    vs = a.vector_stores.create(name="shared")
    batch = a.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=ids)
    done = b.vector_stores.file_batches.poll(batch.id, vector_store_id=vs.id, poll_interval_ms=50)  # polled on b
    assert done.status == "completed" and done.file_counts.completed == 2
    assert {f.id for f in b.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id).data} == set(ids)
    hit = b.vector_stores.search(vector_store_id=vs.id, query="price of the Contour lamp").data[0]
    assert hit.filename == "prices.md" and "49.90" in hit.content[0].text
    reply = b.chat.completions.create(model="up", messages=[{"role": "user", "content": "How many lamps in stock?"}],
                                      extra_body={"context": {"vector_store_ids": [vs.id], "top_k": 1}})
    assert reply.model_dump()["choices"][0]["slm_fusion"]["citations"][0]["filename"] == "stock.csv"
    assert b.files.delete(ids[0]).deleted
    assert [h.filename for h in a.vector_stores.search(vector_store_id=vs.id, query="Contour lamp price").data] \
        == ["stock.csv"]
    assert a.vector_stores.delete(vs.id).deleted
    with pytest.raises(openai.NotFoundError):
        b.vector_stores.retrieve(vs.id)


def test_the_store_commands_work_on_the_database_the_replicas_share(replicas, tmp_path):
    a, _, url = replicas
    (tmp_path / "promo.txt").write_text("Promotion: the Orbit kettle is 20 percent off for members.")
    runner, env = CliRunner(), {"COLUMNS": "160"}
    ingested = runner.invoke(cli_app, ["store", "ingest", str(tmp_path), "--store", "promos", "--db", url], env=env)
    assert ingested.exit_code == 0, ingested.output
    assert "1 file(s) indexed" in ingested.output and "postgres@127.0.0.1" in ingested.output
    store_id = next(s.id for s in a.vector_stores.list().data if s.name == "promos")  # the replica sees it at once
    assert a.vector_stores.search(vector_store_id=store_id, query="Orbit kettle").data[0].filename == "promo.txt"
    found = runner.invoke(cli_app, ["store", "search", "promos", "kettle discount", "--db", url], env=env)
    assert found.exit_code == 0 and "promo.txt" in found.output and "20 percent" in found.output
    listed = runner.invoke(cli_app, ["store", "list", "--db", url], env=env)
    assert listed.exit_code == 0 and store_id in listed.output
