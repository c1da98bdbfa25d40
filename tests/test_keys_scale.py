"""The keys ledger under the two things a single-process test cannot show: a gateway killed with -9 (rows flushed
before the kill are all there, and the window totals agree with them), and two gateways sharing one PostgreSQL
database (a key's budget holds across both)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from gateway_helpers import free_port, gateway_of, serve, serve_gateway, upstream_model
from pg_server import PostgresServer, find_pg_bin
from test_keys import MESSAGES, client, wait_for_refresh

from slm_fusion.backends.mock_upstream import MockUpstream
from slm_fusion.keys import open_store
from slm_fusion.keys.store import PERIODS

FLUSH_S = 0.2


@pytest.fixture(scope="module")
def upstream():
    mock = MockUpstream()
    with serve(mock) as served:
        yield served


def _start_gateway(config_path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slm_fusion.cli", "serve", str(config_path), "--port", str(port),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.1)


def _ask(port: int, secret: str, request_id: str) -> None:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=20,
                   headers={"Authorization": f"Bearer {secret}", "x-request-id": request_id},
                   json={"model": "up", "messages": MESSAGES})
    assert r.status_code == 200, r.text


def test_ledger_rows_flushed_before_a_kill_9_survive_it(upstream, tmp_path):
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    store = open_store(url)
    _, secret = store.create_key("crash", PERIODS["day"], None, None, None)
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"server": {"access_log": False}, "keys": {"url": url, "flush_interval_s": FLUSH_S},
                                  "models": [upstream_model("up", upstream.url)]}))
    port = free_port()
    proc = _start_gateway(config, port)
    try:
        first = [f"first-{i}" for i in range(20)]
        for rid in first:
            _ask(port, secret, rid)
        deadline = time.monotonic() + 30  # the gateway's own flush, every FLUSH_S, writes them
        while {r.request_id for r in store.rows()} != set(first):
            assert time.monotonic() < deadline, "the completed requests never reached the ledger"
            time.sleep(0.05)
        second = [f"second-{i}" for i in range(10)]
        for rid in second:  # completed, but killed before (most of) them are flushed
            _ask(port, secret, rid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rows = store.rows()
    ids = [r.request_id for r in rows]
    assert len(ids) == len(set(ids))  # nothing written twice
    assert set(first) <= set(ids) <= set(first) | set(second)  # every row flushed before the kill is there
    assert all(r.status == 200 and r.prompt_tokens == 7 and r.completion_tokens == 9 and r.model == "up"
               for r in rows)
    key = store.list_keys()[0]
    # Rows and window totals are written in one transaction: a kill leaves them in agreement.
    assert sum(requests for (key_id, _), (requests, _) in store.windows(0).items() if key_id == key.id) == len(rows)

    proc = _start_gateway(config, port)  # the same database serves again after the crash
    try:
        _ask(port, secret, "after-restart")
    finally:
        proc.send_signal(signal.SIGTERM)  # a clean shutdown flushes what is left
        proc.wait(timeout=30)
    assert store.rows()[-1].request_id == "after-restart"
    store.close()


@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL server binaries missing: .ci/run installs them")
def test_two_gateways_enforce_one_budget_through_postgresql(upstream):
    server = PostgresServer().start()
    try:
        store = open_store(server.url)
        _, secret = store.create_key("shared", PERIODS["hour"], None, 6, None)
        config = {"server": {"access_log": False}, "keys": {"url": server.url, "flush_interval_s": 0.1},
                  "models": [upstream_model("up", upstream.url)]}
        with serve_gateway(config) as a, serve_gateway(config) as b:
            ca, cb = client(a, secret), client(b, secret)
            for _ in range(3):
                ca.chat.completions.create(model="up", messages=MESSAGES)
            for _ in range(2):
                cb.chat.completions.create(model="up", messages=MESSAGES)
            wait_for_refresh(gateway_of(a))
            wait_for_refresh(gateway_of(b))
            ca.chat.completions.create(model="up", messages=MESSAGES)  # the 6th, counted across both
            wait_for_refresh(gateway_of(a))
            wait_for_refresh(gateway_of(b))
            for c in (cb, ca):
                with pytest.raises(openai.RateLimitError) as refused:
                    c.chat.completions.create(model="up", messages=MESSAGES)
                assert "budget of 6 requests per hour" in refused.value.body["message"]
        rows = store.rows()
        assert len(rows) == 6 and all(r.status == 200 for r in rows)
        assert list(store.windows(0).values()) == [(6, 6 * 16)]
        store.close()
    finally:
        server.stop()
