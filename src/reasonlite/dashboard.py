"""`reasonlite dashboard [STORAGE]`: optuna-dashboard over a tuning study's storage.

STORAGE is a storage URL, a SQLite `.db` file or a config YAML; none means the storage `reasonlite tune` uses for
the default config (`tune.storage`, else SQLite in the study's run folder: `tune.storage_url`, the one rule). The
dashboard's WSGI app is served by the standard library's wsgiref server (what `optuna-dashboard` itself runs), bound
before the URL is printed, so the printed address is already accepting connections.
"""

from __future__ import annotations

from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from reasonlite.config import ConfigError, load_config


def resolve_storage(storage: str | None, overrides: dict | None = None) -> str:
    """A storage URL from the argument: URL as given, a .db file as SQLite, a config YAML (or none) as its study's."""
    from reasonlite.tune import check_storage_url, storage_url

    if storage is not None and "://" in storage:
        url = storage
    elif storage is not None and Path(storage).suffix == ".db":
        url = f"sqlite:///{Path(storage).resolve()}"
    else:
        if storage is not None and Path(storage).suffix not in (".yaml", ".yml"):
            raise ConfigError(f"dashboard STORAGE {storage}: give a storage URL (sqlite:///path/study.db, "
                              "postgresql://user@host/db), a .db file or a config YAML")
        url = storage_url(load_config(storage, overrides))
    check_storage_url(url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"{url.removeprefix('sqlite:///')}: no study database there; run `reasonlite tune "
                                "CONFIG --space SPACE` first or pass the study's storage URL")
    return url


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the page fetches several API calls at once


def make_dashboard_server(url: str, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """The optuna-dashboard app over `url`, bound to host:port (0 = a free port), not yet serving."""
    import optuna_dashboard

    from reasonlite.tune import rdb_storage

    app = optuna_dashboard.wsgi(rdb_storage(url, heartbeat=60))  # our connection errors: one line, naming the URL
    try:
        return make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    except OSError as e:
        raise OSError(f"dashboard --port {port}: cannot listen on {host}:{port} ({e.strerror}); pick another "
                      "port") from None
