"""Database API keys with budgets and the usage ledger (slm_fusion.keys), through a real uvicorn gateway, the official
`openai` client and the mock upstream; SQLite here, PostgreSQL and kill -9 in test_keys_scale.py."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from gateway_helpers import gateway_of, serve_gateway, upstream_model
from rich.console import Console
from typer.testing import CliRunner

from slm_fusion.cli import app as cli_app
from slm_fusion.keys import KeyAccounting, open_store
from slm_fusion.keys import cli as keys_cli
from slm_fusion.keys.store import PERIODS, UsageRow

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]
STATIC = "sk-static-0123456789"


def _config(upstream, url: str, flush: float = 0.05) -> dict:
    return {
        "server": {"access_log": False, "api_keys": [STATIC]},
        "keys": {"url": url, "flush_interval_s": flush},
        "models": [upstream_model("up", upstream.url), upstream_model("other", upstream.url),
                   upstream_model("flaky", upstream.url, "fail-500")],
        "routing": {"fallbacks": {"flaky": ["up"]}},
    }


def wait_for_refresh(gw, timeout: float = 20.0) -> None:
    """Until the gateway has flushed its ledger and re-read keys and totals once more (its own clock)."""
    start = gw.keys.refreshes
    deadline = time.monotonic() + timeout
    while gw.keys.refreshes < start + 2:  # one refresh may have begun before the caller's last request ended
        assert time.monotonic() < deadline, "the gateway never flushed its ledger"
        time.sleep(0.01)


def client(served, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key=key, max_retries=0, timeout=20)


def test_budgets_models_and_the_ledger(upstream, tmp_path):
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    store = open_store(url)
    _, limited = store.create_key("limited", PERIODS["hour"], None, 4, ["up", "flaky"])
    _, tokens = store.create_key("tokens", PERIODS["day"], 30, None, None)
    with serve_gateway(_config(upstream, url)) as served:
        gw = gateway_of(served)
        c = client(served, limited)
        r = c.chat.completions.create(model="flaky", messages=MESSAGES)  # 500 upstream, served by `up`
        assert r.choices[0].message.content
        stream = list(c.chat.completions.create(model="up", messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True}))
        streamed_usage = stream[-1].usage
        reasoned = c.chat.completions.create(model="up", messages=MESSAGES, extra_body={"reasoning_budget": 40})
        with pytest.raises(openai.PermissionDeniedError) as denied:  # a model this key may not use
            c.chat.completions.create(model="other", messages=MESSAGES)
        assert denied.value.body["code"] == "model_not_allowed" and "may use: up, flaky" in denied.value.body["message"]
        with pytest.raises(openai.RateLimitError) as refused:  # the 5th request this hour (the 403 counted too)
            c.chat.completions.create(model="up", messages=MESSAGES)
        err = refused.value
        assert err.body["code"] == "requests_budget_exceeded" and err.body["type"] == "rate_limit_error"
        assert "budget of 4 requests per hour" in err.body["message"] and "resets at" in err.body["message"]
        assert 1 <= int(err.response.headers["retry-after"]) <= 3600
        # The static key has no budget and writes no ledger row; an unknown key is refused.
        for _ in range(5):
            client(served, STATIC).chat.completions.create(model="other", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            client(served, "sk-fusion-not-a-key").chat.completions.create(model="up", messages=MESSAGES)

        # The token budget: 30 tokens a day; the first answer (7 + 9 tokens) leaves 14, the second spends them.
        t = client(served, tokens)
        t.chat.completions.create(model="other", messages=MESSAGES)
        t.chat.completions.create(model="other", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as spent:
            t.chat.completions.create(model="other", messages=MESSAGES)
        assert spent.value.body["code"] == "tokens_budget_exceeded"
        assert "budget of 30 tokens per day" in spent.value.body["message"]
        wait_for_refresh(gw)

    rows = store.rows()
    by_key = {}
    for row in rows:
        by_key.setdefault(row.key_id, []).append(row)
    limited_id = next(k.id for k in store.list_keys() if k.name == "limited")
    limited_rows = by_key[limited_id]
    assert [r.status for r in limited_rows] == [200, 200, 200, 403]  # refused by budget: never admitted, no row
    fell_back = limited_rows[0]
    assert (fell_back.requested_model, fell_back.model) == ("flaky", "up")  # the model that actually served
    assert "fallback" in fell_back.route
    assert fell_back.prompt_tokens == 7 and fell_back.completion_tokens == 9
    assert limited_rows[1].prompt_tokens == streamed_usage.prompt_tokens
    assert limited_rows[1].completion_tokens == streamed_usage.completion_tokens
    details = reasoned.usage.completion_tokens_details
    assert limited_rows[2].reasoning_tokens == details.reasoning_tokens > 0
    assert limited_rows[2].completion_tokens == reasoned.usage.completion_tokens
    assert all(r.latency_ms > 0 and r.request_id for r in rows)
    assert len(by_key) == 2  # the static key's requests are not in the ledger
    store.close()


def _row(key, ts: float, tokens: int = 10) -> UsageRow:
    return UsageRow(ts=ts, request_id="r", key_id=key.id, path="/v1/chat/completions", requested_model="up",
                    model="up", route="", status=200, prompt_tokens=tokens, completion_tokens=0, reasoning_tokens=0,
                    latency_ms=1.0)


def test_a_budget_window_resets_on_its_boundary_and_replicas_share_totals(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'keys.db'}")
    record, secret = store.create_key("k", PERIODS["minute"], None, 2, None)
    now = [1_000_040.0]  # 20 s into the minute window that starts at 1_000_020 (16_667 * 60)
    clock = lambda: now[0]
    one, two = KeyAccounting(store, 3600, clock=clock), KeyAccounting(open_store(store.url), 3600, clock=clock)

    async def run() -> None:
        await one.refresh()
        await two.refresh()
        key = one.lookup(secret.encode())
        assert key == record
        assert one.lookup(b"sk-fusion-wrong") is None
        assert one.admit(key) is None
        assert one.admit(key) is None  # two in flight: the budget is spent before either finished
        refused = one.admit(key)
        assert refused.status == 429 and refused.headers == {"Retry-After": "40"}
        assert "2 requests per minute" in refused.message and "1970-01-12T13:48:00Z" in refused.message
        one.record(key, _row(key, now[0]))
        one.record(key, _row(key, now[0]))
        assert two.admit(key) is None  # the other replica has not seen them yet: stale by one flush
        two.record(key, _row(key, now[0]))
        await one.flush()
        await two.flush()
        assert store.windows(0) == {(key.id, 1_000_020): (3, 30)}
        assert one.admit(key) is not None and two.admit(key) is not None  # both see 3 >= 2 now
        now[0] += 40  # the next minute
        assert one.admit(key) is None

    asyncio.run(run())
    assert len(store.rows()) == 3


def test_keys_cli_create_use_revoke_usage(upstream, tmp_path, monkeypatch):
    monkeypatch.setattr(keys_cli, "console", Console(width=200))  # tables uncut, whatever the terminal
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    runner = CliRunner()
    made = runner.invoke(cli_app, ["keys", "create", "team-a", "--url", url, "--max-requests", "100",
                                   "--period", "day", "--model", "up"])
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    assert secret.startswith("sk-fusion-")
    listed = runner.invoke(cli_app, ["keys", "list", "--url", url])
    assert "team-a" in listed.output and secret not in listed.output and secret[:14] in listed.output
    with serve_gateway(_config(upstream, url)) as served:
        gw = gateway_of(served)
        c = client(served, secret)
        for _ in range(3):
            c.chat.completions.create(model="up", messages=MESSAGES)
        revoked = runner.invoke(cli_app, ["keys", "revoke", "team-a", "--url", url])
        assert revoked.exit_code == 0, revoked.output
        wait_for_refresh(gw)
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model="up", messages=MESSAGES)
    shown = runner.invoke(cli_app, ["keys", "usage", "--url", url])
    assert shown.exit_code == 0, shown.output
    line = next(ln for ln in shown.output.splitlines() if "team-a" in ln)
    assert [cell.strip() for cell in line.strip("│ ").split("│")][2:5] == ["up", "3", "0"]  # model, requests, errors
    missing = runner.invoke(cli_app, ["keys", "revoke", "nobody", "--url", url])
    assert missing.exit_code == 3 and "no active key" in missing.output


def test_an_unreachable_keys_database_is_one_line_without_the_password():
    from pg_server import _free_port

    out = CliRunner().invoke(cli_app, ["keys", "list", "--url", f"postgresql://u:hunter2@127.0.0.1:{_free_port()}/db"])
    assert out.exit_code == 4
    assert out.output.startswith("error: keys.url postgresql+psycopg2://u:***@127.0.0.1")
    assert "cannot open the keys database" in out.output and "hunter2" not in out.output
    assert len(out.output.strip().splitlines()) == 1
