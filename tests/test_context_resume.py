"""Kill -9 safety of the context store's long jobs, with real child processes killed mid-way and then rerun:

- a gateway (a real uvicorn subprocess) killed while a file batch is embedding its third file: the restarted gateway
  resumes the batch, which completes with every file indexed once, no duplicate chunks, and no completed file
  embedded again (on the SQLite file and on PostgreSQL + pgvector);
- two stores on one file: only the holder of a batch's lease runs it, and a runner whose lease was taken over stops;
- `slm-fusion store ingest` killed mid-folder: the files it finished stay indexed, and the rerun indexes the rest
  without embedding a finished file again.

The children embed with a deterministic stand-in for MiniLM that logs every text it embeds and holds (signal.pause,
announced in a flag file) on the text the test names, so each kill lands at a known point without a sleep.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml
from gateway_helpers import free_port
from pg_server import start_pgvector_server_or_skip

from slm_fusion.context.store import ContextStore, open_store

# The embedder every child uses, patched into slm_fusion.deployments.Embedder before the app or the CLI starts.
EMBEDDER = """
import json, os, re, signal, zlib
from pathlib import Path
import numpy as np
from slm_fusion import deployments

def vectors(self, texts):
    with open(os.environ["EMBED_LOG"], "a") as log:
        log.write("".join(json.dumps(t) + "\\n" for t in texts))
    if os.environ.get("HOLD_ON") and any(os.environ["HOLD_ON"] in t for t in texts):
        Path(os.environ["HELD_FLAG"]).write_text("held")
        signal.pause()  # held mid-embedding until the test's SIGKILL arrives
    out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(16) for t in texts])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

deployments.Embedder.vectors = vectors
deployments.Embedder.offsets = lambda self, text: [m.span() for m in re.finditer(r"\\S+", text)]
"""
GATEWAY = EMBEDDER + """
import sys
import uvicorn
from slm_fusion.app import create_app
from slm_fusion.config import load_fusion_config
uvicorn.run(create_app(load_fusion_config(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""
INGEST = EMBEDDER + """
import sys
from slm_fusion.cli import app
app(sys.argv[1:], prog_name="slm-fusion")
"""
TEXTS = [f"Catalogue page {i}: the Orbit kettle number {i} costs {10 + i} dollars." for i in range(4)]


def _fake_embed(texts: list[str]) -> np.ndarray:
    out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(16) for t in texts])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _tokens(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def _child(tmp_path: Path, code: str, args: list[str], hold_on: str | None = None) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(code)
    env = {**os.environ, "EMBED_LOG": str(tmp_path / "embedded.jsonl"), "HELD_FLAG": str(tmp_path / "held"),
           "HOLD_ON": hold_on or "", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(what: str, ready, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _gateway(tmp_path: Path, config: Path, hold_on: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = _child(tmp_path, GATEWAY, [str(config), str(port)], hold_on)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url + "/health", timeout=2).status_code == 200
        return False

    _wait_for("the gateway answered /health", up, proc)
    return proc, url


def _embedded(tmp_path: Path) -> list[str]:
    return [json.loads(line) for line in (tmp_path / "embedded.jsonl").read_text().splitlines()]


@pytest.fixture(params=["sqlite", "postgresql"])
def context_db(request, tmp_path):
    """The gateway's `context:` section and a way to read the chunks table: the SQLite file, or PostgreSQL."""
    if request.param == "sqlite":
        yield {"path": str(tmp_path / "context.db")}
        return
    pg = start_pgvector_server_or_skip()
    try:
        yield {"url": pg.url}
    finally:
        pg.stop()


def _chunks_per_file(context: dict) -> dict[str, int]:
    store = open_store(context.get("url") or context["path"], _fake_embed, _tokens)
    try:
        return {r["file_id"]: r["n"] for r in store._q("SELECT file_id, count(*) AS n FROM chunks GROUP BY file_id")}
    finally:
        store.close()


def test_a_batch_whose_gateway_was_killed_resumes_on_restart_and_indexes_each_file_once(tmp_path, context_db):
    config = tmp_path / "gateway.yaml"  # a 1 s lease: the restarted gateway finds the killed worker's lease expired
    config.write_text(yaml.safe_dump({"models": [], "embeddings": {}, "server": {"access_log": False},
                                      "context": {**context_db, "batch_lease_s": 1}}))
    proc, url = _gateway(tmp_path, config, hold_on="Catalogue page 2")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        ids = [client.files.create(file=(f"page{i}.txt", io.BytesIO(t.encode())), purpose="assistants").id
               for i, t in enumerate(TEXTS)]
        vs = client.vector_stores.create(name="catalogue")
        batch = client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=ids)
        _wait_for("the batch held on its third file", (tmp_path / "held").exists, proc)
        counts = client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=vs.id).file_counts
        assert (counts.completed, counts.in_progress) == (2, 2)
    finally:
        _kill(proc)
    assert _embedded(tmp_path) == TEXTS[:3]  # killed while embedding the third file (never committed)
    proc, url = _gateway(tmp_path, config)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        def finished() -> bool:  # the SDK's poll has no deadline
            return client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=vs.id).status != "in_progress"

        _wait_for("the resumed batch finished", finished, proc)
        done = client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=vs.id)
        assert done.status == "completed"
        assert (done.file_counts.completed, done.file_counts.in_progress, done.file_counts.total) == (4, 0, 4)
        listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id).data
        assert sorted(f.id for f in listed) == sorted(ids) and {f.status for f in listed} == {"completed"}
        hit = client.vector_stores.search(vector_store_id=vs.id, query="Orbit kettle number 3").data[0]
        assert hit.filename == "page3.txt"
    finally:
        _kill(proc)
    # the completed files were not embedded again; the one killed mid-embedding was, once; one chunk per file
    assert _embedded(tmp_path)[3:5] == TEXTS[2:] and _embedded(tmp_path)[5:] == ["Orbit kettle number 3"]
    assert _chunks_per_file(context_db) == dict.fromkeys(ids, 1)


def _join(store: ContextStore, bid: str) -> None:
    """Wait for this process's runner of the batch, if it is still running."""
    runner = store._running.get(bid)
    if runner is not None:
        runner.join(30)
        assert not runner.is_alive()


def test_only_the_lease_holder_runs_a_batch_and_a_runner_taken_over_stops(tmp_path):
    path = tmp_path / "shared.db"
    entered, release = threading.Event(), threading.Event()
    embedded: list[str] = []

    def embed_a(texts):  # worker A holds on the second file, as if stalled
        embedded.extend(f"A {t}" for t in texts)
        if texts == [TEXTS[1]]:
            entered.set()
            release.wait(30)
        return _fake_embed(texts)

    def embed_b(texts):
        embedded.extend(f"B {t}" for t in texts)
        return _fake_embed(texts)

    # A's heartbeat would not beat during the test (an hour's lease): the test expires A's lease itself
    a, b = ContextStore(path, embed_a, _tokens, batch_lease_s=3600), ContextStore(path, embed_b, _tokens)
    sid = a.create_store("s", None)["id"]
    fids = [a.add_file(f"page{i}.txt", t.encode(), "assistants")["id"] for i, t in enumerate(TEXTS)]
    bid = a.create_batch(sid, [(f, None, None) for f in fids])["id"]
    assert a.start_batch(bid) and not a.start_batch(bid)  # one runner per process
    assert entered.wait(30)
    assert not b.start_batch(bid) and b.resume_batches() == []  # A's lease is live: B leaves the batch alone
    b._q("UPDATE batch_leases SET expires_at = 0 WHERE batch_id = ?", (bid,))  # A stopped renewing (stalled)
    assert b.resume_batches() == [bid]
    _join(b, bid)
    release.set()  # A finishes its file (its write is refused: B completed it) and sees it lost the lease
    _join(a, bid)
    assert b.batch(sid, bid)["status"] == "completed" and b.batch(sid, bid)["file_counts"] == {"completed": 4}
    assert [e for e in embedded if e.startswith("B")] == [f"B {t}" for t in TEXTS[1:]]  # B: what A had not done
    assert [e for e in embedded if e.startswith("A")] == [f"A {t}" for t in TEXTS[:2]]  # A stopped after its file
    with sqlite3.connect(path) as conn:  # A's late write of file 1 was refused: one chunk per file
        assert conn.execute("SELECT file_id, count(*) FROM chunks GROUP BY file_id").fetchall() == sorted(
            (f, 1) for f in fids)
    a.close()
    b.close()


def test_a_killed_ingest_keeps_the_files_it_finished_and_the_rerun_indexes_the_rest_once(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"page{i}.txt").write_text(text)
    db = tmp_path / "ingest.db"
    args = ["store", "ingest", str(folder), "--store", "catalogue", "--db", str(db)]
    proc = _child(tmp_path, INGEST, args, hold_on="Catalogue page 2")
    try:
        _wait_for("the ingest held on its third file", (tmp_path / "held").exists, proc)
    finally:
        _kill(proc)
    with sqlite3.connect(db) as conn:  # what was committed before the kill is there
        done = conn.execute("SELECT f.filename FROM store_files s JOIN files f ON f.id = s.file_id WHERE "
                            "s.status = 'completed' ORDER BY f.filename").fetchall()
        assert done == [("page0.txt",), ("page1.txt",)]
    proc = _child(tmp_path, INGEST, args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "2 file(s) indexed, 2 unchanged skipped, 4 chunks in all" in " ".join(out.split())
    assert _embedded(tmp_path) == [*TEXTS[:3], *TEXTS[2:]]  # page0-1 once; page2 again (killed mid-way); page3
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT f.filename, s.status, (SELECT count(*) FROM chunks c WHERE c.file_id = f.id) "
                            "FROM files f JOIN store_files s ON s.file_id = f.id ORDER BY f.filename").fetchall()
    assert rows == [(f"page{i}.txt", "completed", 1) for i in range(4)]  # no duplicate file, no duplicate chunk
