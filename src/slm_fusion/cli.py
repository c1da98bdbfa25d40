"""`slm-fusion` command line: serve the gateway, check a config. Other areas add their commands to `app`."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from reasonlite.cli_boundary import OneLineErrorsGroup, version_callback

# Errors: one line on stderr and exit 2 usage/config, 3 data/model not found, 4 runtime (reasonlite.cli_boundary).
app = typer.Typer(help="SLM-Fusion: serve, route and merge small language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=OneLineErrorsGroup)
console = Console()


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class Engine(str, Enum):
    uvicorn = "uvicorn"
    ray = "ray"


class PortInUse(OSError):
    """The gateway's port is taken: found before any model is loaded."""


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=version_callback("slm-fusion"), is_eager=True,
                                                help="Print the version and exit.")] = False,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False
          ) -> None:
    """SLM-Fusion: serve, route and merge small language models."""


def _load(config: Path):
    from slm_fusion.config import load_fusion_config

    return load_fusion_config(config)  # ConfigError: one line, exit 2


def model_file_problems(cfg) -> list[str]:
    """What is missing on disk for each local model (a folder without config/weights, a missing .gguf)."""
    from reasonlite.models import KNOWN_MODELS
    from slm_fusion.backends.llamacpp import GGUF_ALIASES

    problems = []
    for i, m in enumerate(cfg.models):
        where = f"models[{i}].model ({m.name})"
        if m.backend == "llamacpp":
            if m.model not in GGUF_ALIASES and not Path(m.model).expanduser().is_file():
                problems.append(f"{where}: GGUF file {m.model} does not exist; give a .gguf path (relative to the "
                                f"YAML) or one of {sorted(GGUF_ALIASES)}")
        elif m.backend == "transformers" and m.model not in KNOWN_MODELS:
            path = Path(m.model).expanduser()
            if path.is_file() and path.suffix == ".gguf":
                continue
            if not path.is_dir():
                problems.append(f"{where}: {m.model} is neither a model folder nor a built-in alias "
                                f"({', '.join(KNOWN_MODELS)})")
                continue
            weights = [p for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json")
                       for p in path.glob(pattern)]
            if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
                problems.append(f"{where}: {path} has no config.json (or adapter_config.json); not a HF model folder")
            elif not weights:
                problems.append(f"{where}: {path} has no weight files (*.safetensors / *.bin); copy the weights")
    return problems


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUse(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); stop the process "
                            "using it or pick another --port") from None


@app.command()
def check(config: Annotated[Path, typer.Argument(help="Gateway YAML config.")]) -> None:
    """Validate a gateway config without loading any model; print the models table."""
    cfg = _load(config)
    problems = model_file_problems(cfg)
    if problems:  # exit 3: data/model not found
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FileNotFoundError(f"{config}: {problems[0]}{more}")
    table = Table(title=f"{config} — {len(cfg.models)} model(s)")
    for col in ("name", "backend", "model", "concurrency", "queue", "timeout_s", "replicas"):
        table.add_column(col)
    for m in cfg.models:
        table.add_row(m.name, m.backend, m.model, str(m.max_concurrency), str(m.max_queue),
                      str(m.timeout_s or cfg.server.request_timeout_s), str(m.replicas))
    console.print(table)
    keys = cfg.server.resolved_api_keys()
    auth = f"on ({len(keys)} static key(s)" + (f" + database keys at {cfg.keys.url}" if cfg.keys else "") + ")" \
        if keys or cfg.keys else "off"
    console.print(f"auth: {auth}; tracing: {'on' if cfg.tracing.enabled else 'off'}; "
                  f"max_request_bytes={cfg.server.max_request_bytes}; "
                  f"embeddings: {cfg.embeddings.name if cfg.embeddings else 'off'}; "
                  f"virtual models: {len(cfg.virtual_models)}; console: {'/ui' if cfg.ui.enabled else 'off'}")
    if cfg.ui.enabled and cfg.ui.runs_dir and not Path(cfg.ui.runs_dir).is_dir():
        console.print(f"[yellow]warning: ui.runs_dir={cfg.ui.runs_dir} is not a folder yet (the Runs page shows no "
                      "run until `reasonlite run` writes one there)[/yellow]")
    if cfg.server.api_keys_env and not os.environ.get(cfg.server.api_keys_env):
        console.print(f"[yellow]warning: server.api_keys_env={cfg.server.api_keys_env} is not set[/yellow]")
    from slm_fusion.routing.cli import check_routing

    check_routing(cfg)  # builds routers: a missing model, exemplar or classifier file fails here, not per request
    console.print("[green]config OK[/green]")


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="Gateway YAML config.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port (1-65535).")] = 8000,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.info,
    graceful_timeout: Annotated[float, typer.Option(min=0, help="Seconds in-flight requests get to finish on shutdown.")] = 30.0,
    keep_alive: Annotated[int, typer.Option(min=1, help="Idle keep-alive seconds; above clients' pool expiry (httpx: 5).")] = 75,
    engine: Annotated[Engine, typer.Option(help="uvicorn: one process; ray: Ray Serve (ingress + a deployment per "
                                                "local model; needs the `ray` extra).")] = Engine.uvicorn,
    address: Annotated[str | None, typer.Option(help="--engine ray: Ray cluster to join (`auto`: the one `ray start "
                                                     "--head` started); default a local Ray.")] = None,
) -> None:
    """Serve the OpenAI-compatible gateway (Ctrl-C stops it after in-flight requests finish)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = _load(config)
    problems = model_file_problems(cfg)
    if problems:
        raise FileNotFoundError(f"{config}: {problems[0]}")
    if address is not None and engine is not Engine.ray:
        raise typer.BadParameter("--address joins a Ray cluster: add --engine ray", param_hint="--address")
    _check_port_free(host, port)  # before loading any model: a taken port is found in a second, not minutes
    log_level = log_level.value
    if engine is Engine.ray:
        _serve_on_ray(cfg, host, port, address)
        return
    import uvicorn

    from slm_fusion.app import configure_logging, create_app

    configure_logging(log_level)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=graceful_timeout, timeout_keep_alive=keep_alive)


def _serve_on_ray(cfg, host: str, port: int, address: str | None) -> None:
    try:
        import ray.serve  # noqa: F401

        from slm_fusion import deploy_ray
    except ImportError:
        raise typer.BadParameter("needs Ray Serve: pip install 'reasonlite[ray]' (ray[serve]==2.58.0)",
                                 param_hint="--engine ray") from None
    console.print(f"Ray Serve: gateway on http://{host}:{port} (Ctrl-C stops it)")
    try:
        deploy_ray.run(cfg, host=host, port=port, address=address)  # blocks until Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        from ray import serve

        serve.shutdown()


def _register_merge_commands() -> None:
    from slm_fusion.merging.cli import register  # imports no torch: the commands import the merge modules lazily

    register(app)


_register_merge_commands()


def _register_routing_commands() -> None:
    from slm_fusion.routing.cli import register  # `router train`, `route-eval`; heavy imports stay inside commands

    register(app)


_register_routing_commands()


def _register_keys_commands() -> None:
    from slm_fusion.keys.cli import register  # `keys create|list|revoke|usage`; SQLAlchemy imported per command

    register(app)


_register_keys_commands()


def _register_store_commands() -> None:
    from slm_fusion.context.cli import register  # `store ingest|search|list`; the embedding model loads per command

    register(app)


_register_store_commands()


if __name__ == "__main__":
    app()
