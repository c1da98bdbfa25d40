"""`slm-fusion` command line: serve the gateway, check a config. Other areas add their commands to `app`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="SLM-Fusion: serve, route and merge small language models.", no_args_is_help=True)
console = Console()


def _load(config: Path):
    from slm_fusion.config import ConfigError, load_fusion_config

    try:
        return load_fusion_config(config)
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(code=2) from None


@app.command()
def check(config: Annotated[Path, typer.Argument(help="Gateway YAML config.")]) -> None:
    """Validate a gateway config without loading any model; print the models table."""
    cfg = _load(config)
    table = Table(title=f"{config} — {len(cfg.models)} model(s)")
    for col in ("name", "backend", "model", "concurrency", "queue", "timeout_s", "replicas"):
        table.add_column(col)
    for m in cfg.models:
        table.add_row(m.name, m.backend, m.model, str(m.max_concurrency), str(m.max_queue),
                      str(m.timeout_s or cfg.server.request_timeout_s), str(m.replicas))
    console.print(table)
    keys = cfg.server.resolved_api_keys()
    console.print(f"auth: {'on (' + str(len(keys)) + ' key(s))' if keys else 'off'}; "
                  f"max_request_bytes={cfg.server.max_request_bytes}; "
                  f"embeddings: {cfg.embeddings.name if cfg.embeddings else 'off'}; "
                  f"virtual models: {len(cfg.virtual_models)}")
    if cfg.server.api_keys_env and not os.environ.get(cfg.server.api_keys_env):
        console.print(f"[yellow]warning: server.api_keys_env={cfg.server.api_keys_env} is not set[/yellow]")
    from slm_fusion.routing.cli import check_routing

    check_routing(cfg)  # builds routers: a missing model, exemplar or classifier file fails here, not per request
    console.print("[green]config OK[/green]")


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="Gateway YAML config.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
    graceful_timeout: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish on shutdown.")] = 30.0,
    keep_alive: Annotated[int, typer.Option(help="Idle keep-alive seconds; above clients' pool expiry (httpx: 5).")] = 75,
) -> None:
    """Serve the OpenAI-compatible gateway (Ctrl-C stops it after in-flight requests finish)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import uvicorn

    from slm_fusion.app import configure_logging, create_app

    cfg = _load(config)
    configure_logging(log_level)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=graceful_timeout, timeout_keep_alive=keep_alive)


def _register_merge_commands() -> None:
    from slm_fusion.merging.cli import register  # imports no torch: the commands import the merge modules lazily

    register(app)


_register_merge_commands()


def _register_routing_commands() -> None:
    from slm_fusion.routing.cli import register  # `router train`, `route-eval`; heavy imports stay inside commands

    register(app)


_register_routing_commands()


if __name__ == "__main__":
    app()
