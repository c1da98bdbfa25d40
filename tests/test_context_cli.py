"""`slm-fusion store ingest|search|list` (slm_fusion.context.cli): a folder of documents (markdown, text, PDF) into a
named vector store with the real MiniLM embedder, searched and listed from the shell, re-ingested idempotently; the
gateway started from the same YAML then serves that store to the official `openai` client on 127.0.0.1. Bad input is
one line naming the argument, exit 2."""

from __future__ import annotations

import re

import openai
import pytest
from context_helpers import make_pdf
from gateway_helpers import serve
from typer.testing import CliRunner

from slm_fusion.app import create_app
from slm_fusion.cli import app as cli_app
from slm_fusion.config import load_fusion_config

runner = CliRunner()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    folder = root / "docs"
    folder.mkdir()
    (folder / "prices.md").write_text("# Price list\nThe Contour desk lamp costs 49.90 dollars.\n")
    (folder / "policy.txt").write_text("Returns policy. Sale items cannot be returned.\n")
    (folder / "warranty.pdf").write_bytes(make_pdf([["Warranty.", "The Aria kettle has a three year warranty."]]))
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # not a supported type: a folder walk leaves it out
    config = root / "gateway.yaml"
    config.write_text("embeddings: {}\ncontext: {path: shop.db}\nserver: {access_log: false}\nmodels: []\n")
    return root, folder, config


def _run(*args: str):
    result = runner.invoke(cli_app, list(args), env={"COLUMNS": "160"})  # rich's tables, one row a line
    return result, " ".join(result.output.split())


def test_ingest_search_list_and_reingest(docs):
    root, folder, config = docs
    result, out = _run("store", "ingest", str(folder), "--store", "retail", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "3 file(s) indexed, 0 unchanged skipped" in out and str(root / "shop.db") in out
    store_id = re.search(r"vector store (vs_\w+)", out).group(1)
    result, out = _run("store", "search", "retail", "How long is the kettle warranty?", "--top-k", "2",
                       "--config", str(config))
    assert result.exit_code == 0, result.output
    first = next(line for line in result.output.splitlines() if "│ 1 " in line)
    assert "warranty.pdf" in first and "three year" in out
    result, out = _run("store", "list", "--db", str(root / "shop.db"))
    assert result.exit_code == 0 and store_id in out and "retail" in out
    row = next(line for line in result.output.splitlines() if store_id in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")][1:4] == ["retail", "3", "3"]
    (folder / "policy.txt").write_text("Returns policy. Sale items can be returned within 7 days.\n")
    result, out = _run("store", "ingest", str(folder), "--store", store_id, "--config", str(config))
    assert result.exit_code == 0 and "1 file(s) indexed, 2 unchanged skipped" in out  # the changed file only
    result, out = _run("store", "search", "retail", "can sale items be returned", "--top-k", "1", "--config",
                       str(config))
    assert "within 7 days" in out and "cannot" not in out  # the old copy left with its chunks


def test_the_gateway_serves_what_the_cli_ingested(docs):
    _, _, config = docs
    _, out = _run("store", "list", "--config", str(config))
    store_id = re.search(r"(vs_\w+)", out).group(1)
    with serve(create_app(load_fusion_config(config))) as served:
        client = openai.OpenAI(base_url=served.v1, api_key="x", max_retries=0, timeout=120)
        assert client.vector_stores.retrieve(store_id).file_counts.completed == 3
        hit = client.vector_stores.search(vector_store_id=store_id, query="Contour desk lamp price").data[0]
        assert hit.filename == "prices.md" and "49.90" in hit.content[0].text


@pytest.mark.parametrize(("args", "names"), [
    (["store", "ingest", "missing-folder", "--store", "s", "--db", "x.db"], ["PATH", "does not exist"]),
    (["store", "ingest", "{folder}/notes.bin", "--store", "s", "--db", "{root}/x.db"], ["PATH", "not supported"]),
    (["store", "ingest", "{folder}", "--store", "s", "--db", "x.db", "--config", "{config}"], ["not both"]),
    (["store", "search", "nope", "lamp", "--config", "{config}"], ["NAME", "no vector store 'nope'", "store list"]),
    (["store", "search", "retail", "lamp", "--top-k", "0", "--config", "{config}"], ["--top-k"]),
    (["store", "list", "--db", "{root}/absent.db"], ["no store file", "store ingest"]),
    (["store", "list", "--config", "{root}/plain.yaml"], ["--config", "no `context:` section"]),
])
def test_bad_input_is_one_line_naming_the_argument_exit_2(docs, args, names):
    root, folder, config = docs
    (root / "plain.yaml").write_text("models: []\n")
    result = runner.invoke(cli_app, [a.format(root=root, folder=folder, config=config) for a in args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert all(n in result.output for n in names), result.output
