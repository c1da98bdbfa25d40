"""`slm-fusion keys create|list|revoke|usage`: manage the database keys a gateway with a `keys:` section accepts.

The database is the config's `keys.url` (`--config gateway.yaml`) or `--url` itself. A running gateway sees a new
or revoked key within `keys.flush_interval_s` (it re-reads the keys at every ledger flush).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
keys_app = typer.Typer(help="API keys with budgets, and their usage (the gateway's `keys:` database).",
                       no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Gateway YAML whose `keys.url` names the database.")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="Database URL (sqlite:///keys.db, postgresql://...); "
                                                          "instead of --config.")]


def _store(config: Path | None, url: str | None):
    from slm_fusion.keys.store import open_store

    if (config is None) == (url is None):
        raise typer.BadParameter("pass exactly one of --config (a gateway YAML with `keys:`) or --url")
    if config is not None:
        from slm_fusion.config import load_fusion_config

        cfg = load_fusion_config(config)
        if cfg.keys is None:
            raise ValueError(f"{config}: no `keys:` section; add `keys: {{url: sqlite:///keys.db}}` or pass --url")
        url = cfg.keys.url
    return open_store(url)  # a bad URL or a database it cannot reach: one line (ValueError, ConnectionError)


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    period: Annotated[str, typer.Option(help="Budget window: minute, hour, day or week (resets on its boundary, "
                                             "UTC).")] = "day",
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Prompt + completion tokens per period.")] = None,
    max_requests: Annotated[int | None, typer.Option(min=1, help="Requests per period.")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="A model the key may use (repeat); "
                                                                     "default: every model.")] = None,
    config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Create a key; its secret is printed once (only its sha256 is stored)."""
    from slm_fusion.keys.store import PERIODS

    if period not in PERIODS:
        raise typer.BadParameter(f"--period {period!r}: use one of {', '.join(PERIODS)}")
    store = _store(config, url)
    record, secret = store.create_key(name, PERIODS[period], max_tokens, max_requests, model or None)
    store.close()
    console.print(f"created {record.id} ({name}): tokens/{period}={max_tokens or 'unlimited'}, "
                  f"requests/{period}={max_requests or 'unlimited'}, models={', '.join(model) if model else 'all'}")
    console.print("secret (shown once, store it now):")
    typer.echo(secret)


@keys_app.command("list")
def list_keys(
    all_: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """The keys and their budgets (never their secrets)."""
    store = _store(config, url)
    records = store.list_keys(include_revoked=all_)
    store.close()
    table = Table(title=f"{len(records)} key(s)")
    for col in ("id", "name", "prefix", "period", "max tokens", "max requests", "models", "created", "revoked"):
        table.add_column(col, no_wrap=col == "id")  # the id is what `keys revoke` takes: never cut
    for k in records:
        table.add_row(k.id, k.name, k.prefix + "...", k.period, str(k.max_tokens or "-"), str(k.max_requests or "-"),
                      ", ".join(k.models) if k.models else "all", _when(k.created), _when(k.revoked))
    console.print(table)


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="Key id (key_...) or name.")],
    config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Revoke a key: gateways refuse it (401) within one flush interval."""
    store = _store(config, url)
    count = store.revoke(key)
    store.close()
    if count == 0:
        raise KeyNotFound(f"no active key with id or name '{key}' (see `slm-fusion keys list`)")
    console.print(f"revoked {count} key(s) named or numbered '{key}'")


@keys_app.command("usage")
def usage(
    since_hours: Annotated[float, typer.Option("--since-hours", min=0, help="Period: the last this many hours.")] = 24,
    config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Totals per key and model over a period, from the ledger (rows up to the gateways' last flush)."""
    store = _store(config, url)
    since = time.time() - since_hours * 3600
    rows = store.usage(since)
    store.close()
    table = Table(title=f"usage since {_when(since)} ({since_hours:g} h)")
    for col in ("key", "name", "model", "requests", "errors", "prompt", "completion", "reasoning", "mean ms"):
        table.add_column(col, justify="right" if col not in ("key", "name", "model") else "left", no_wrap=col == "key")
    for r in rows:
        table.add_row(r["key_id"], r["name"] or "?", r["model"] or "-", str(r["requests"]), str(r["errors"]),
                      str(r["prompt_tokens"]), str(r["completion_tokens"]), str(r["reasoning_tokens"]),
                      f"{r['mean_latency_ms']:.1f}")
    console.print(table)


class KeyNotFound(LookupError):
    exit_code = 3  # reasonlite.cli_boundary: data not found


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
