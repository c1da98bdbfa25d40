"""The keys database: API keys (stored as sha256 hashes, with their budgets), the usage ledger, and per-window usage
totals — one SQLAlchemy code path for SQLite (one host) and PostgreSQL (several replicas sharing it).

`KeyStore` is the protocol the gateway and the CLI use; `STORES` maps a URL scheme to the class that opens it.
Budgets are fixed windows of `period_s` seconds aligned to the epoch (an hourly budget resets on the hour, UTC).
`usage_windows` holds one row per (key, window) with its request and token totals, upserted in the same transaction
as the ledger rows, so a budget check reads one small row per key instead of summing the ledger.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

PERIODS = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}
SECRET_PREFIX = "sk-fusion-"

_meta = sa.MetaData()
api_keys = sa.Table(
    "api_keys", _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(32), nullable=False),  # the first characters, to recognise a key in `keys list`
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked", sa.Float),
    sa.Column("period_s", sa.Integer, nullable=False),
    sa.Column("max_tokens", sa.BigInteger),
    sa.Column("max_requests", sa.BigInteger),
    sa.Column("models", sa.Text),  # JSON list of allowed model names; NULL = every model
)
usage = sa.Table(
    "usage", _meta,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False, index=True),  # when the request arrived (unix seconds)
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False, index=True),
    sa.Column("path", sa.String(200), nullable=False),
    sa.Column("requested_model", sa.String(200), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),  # the model that served, after fallbacks
    sa.Column("route", sa.String(300), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
)
usage_windows = sa.Table(
    "usage_windows", _meta,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("window_start", sa.BigInteger, primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    prefix: str
    created: float
    revoked: float | None
    period_s: int
    max_tokens: int | None  # prompt + completion tokens (reasoning tokens are completion tokens) per window
    max_requests: int | None
    models: tuple[str, ...] | None

    def window(self, ts: float) -> int:
        return int(ts // self.period_s) * self.period_s

    @property
    def period(self) -> str:
        return next((name for name, s in PERIODS.items() if s == self.period_s), f"{self.period_s}s")


@dataclass
class UsageRow:
    ts: float
    request_id: str
    key_id: str
    path: str
    requested_model: str
    model: str
    route: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    latency_ms: float

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class KeyStore(Protocol):
    def create_key(self, name: str, period_s: int, max_tokens: int | None, max_requests: int | None,
                   models: list[str] | None) -> tuple[KeyRecord, str]:
        """A new key and its secret (returned once: only its hash is stored)."""

    def list_keys(self, include_revoked: bool = False) -> list[KeyRecord]: ...

    def keys_with_hashes(self, include_revoked: bool = False) -> list[tuple[KeyRecord, str]]:
        """The keys with their sha256 hashes (what the gateway matches a presented key against)."""

    def revoke(self, id_or_name: str) -> int:
        """Revoke by id or name; returns how many keys were revoked."""

    def write(self, rows: list[UsageRow], windows: dict[tuple[str, int], tuple[int, int]]) -> None:
        """Ledger rows and their (key, window) -> (requests, tokens) increments, in one transaction."""

    def windows(self, since: int) -> dict[tuple[str, int], tuple[int, int]]:
        """(key, window start) -> (requests, tokens) for windows starting at or after `since`."""

    def usage(self, since: float) -> list[dict]:
        """Ledger totals per key and model since `since`."""

    def close(self) -> None: ...


def hash_secret(secret: bytes | str) -> str:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).hexdigest()


class SqlKeyStore:
    """SQLAlchemy Core over SQLite or PostgreSQL: the same statements, the dialect's own upsert."""

    def __init__(self, url: str) -> None:
        self.url = url
        # One flush at a time per gateway: a small pool keeps 100 replicas within PostgreSQL's max_connections.
        pool = {} if url.startswith("sqlite") else {"pool_size": 2, "max_overflow": 2}
        self.engine = sa.create_engine(url, pool_pre_ping=True, **pool)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        self._insert = insert
        try:
            _meta.create_all(self.engine)
        except sa.exc.DBAPIError:  # another replica created the tables at the same moment
            _meta.create_all(self.engine)

    def create_key(self, name: str, period_s: int, max_tokens: int | None, max_requests: int | None,
                   models: list[str] | None) -> tuple[KeyRecord, str]:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(id="key_" + secrets.token_hex(8), name=name, prefix=secret[:len(SECRET_PREFIX) + 4],
                           created=time.time(), revoked=None, period_s=period_s, max_tokens=max_tokens,
                           max_requests=max_requests, models=tuple(models) if models else None)
        with self.engine.begin() as c:
            c.execute(api_keys.insert().values(
                id=record.id, name=name, key_hash=hash_secret(secret), prefix=record.prefix, created=record.created,
                period_s=period_s, max_tokens=max_tokens, max_requests=max_requests,
                models=json.dumps(list(models)) if models else None))
        return record, secret

    def list_keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        return [record for record, _ in self.keys_with_hashes(include_revoked)]

    def keys_with_hashes(self, include_revoked: bool = False) -> list[tuple[KeyRecord, str]]:
        query = sa.select(api_keys).order_by(api_keys.c.created)
        if not include_revoked:
            query = query.where(api_keys.c.revoked.is_(None))
        with self.engine.connect() as c:
            rows = c.execute(query).mappings().all()
        return [(KeyRecord(id=r["id"], name=r["name"], prefix=r["prefix"], created=r["created"], revoked=r["revoked"],
                           period_s=r["period_s"], max_tokens=r["max_tokens"], max_requests=r["max_requests"],
                           models=tuple(json.loads(r["models"])) if r["models"] else None), r["key_hash"])
                for r in rows]

    def revoke(self, id_or_name: str) -> int:
        with self.engine.begin() as c:
            return c.execute(api_keys.update()
                             .where(sa.or_(api_keys.c.id == id_or_name, api_keys.c.name == id_or_name))
                             .where(api_keys.c.revoked.is_(None)).values(revoked=time.time())).rowcount

    def write(self, rows: list[UsageRow], windows: dict[tuple[str, int], tuple[int, int]]) -> None:
        with self.engine.begin() as c:
            if rows:
                c.execute(usage.insert(), [r.__dict__ for r in rows])
            for (key_id, start), (requests, tokens) in windows.items():
                stmt = self._insert(usage_windows).values(key_id=key_id, window_start=start, requests=requests,
                                                          tokens=tokens)
                c.execute(stmt.on_conflict_do_update(
                    index_elements=[usage_windows.c.key_id, usage_windows.c.window_start],
                    set_={"requests": usage_windows.c.requests + stmt.excluded.requests,
                          "tokens": usage_windows.c.tokens + stmt.excluded.tokens}))

    def windows(self, since: int) -> dict[tuple[str, int], tuple[int, int]]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(usage_windows).where(usage_windows.c.window_start >= since)).all()
        return {(r.key_id, r.window_start): (r.requests, r.tokens) for r in rows}

    def usage(self, since: float) -> list[dict]:
        u = usage.c
        query = (sa.select(u.key_id, api_keys.c.name, u.model, sa.func.count().label("requests"),
                           sa.func.sum(u.prompt_tokens).label("prompt_tokens"),
                           sa.func.sum(u.completion_tokens).label("completion_tokens"),
                           sa.func.sum(u.reasoning_tokens).label("reasoning_tokens"),
                           sa.func.sum(sa.case((u.status >= 400, 1), else_=0)).label("errors"),
                           sa.func.avg(u.latency_ms).label("mean_latency_ms"))
                 .select_from(usage.outerjoin(api_keys, api_keys.c.id == u.key_id))
                 .where(u.ts >= since).group_by(u.key_id, api_keys.c.name, u.model).order_by(u.key_id, u.model))
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(query).mappings().all()]

    def rows(self) -> list[UsageRow]:
        """Every ledger row, oldest first (tests, exports)."""
        with self.engine.connect() as c:
            found = c.execute(sa.select(usage).order_by(usage.c.id)).mappings().all()
        return [UsageRow(**{k: v for k, v in r.items() if k != "id"}) for r in found]

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL: the gateway's writes and `keys create` from the CLI do not block each other; a committed transaction
    # survives the process being killed (synchronous=NORMAL is durable against a process crash, not power loss).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


STORES: dict[str, type[SqlKeyStore]] = {"sqlite": SqlKeyStore, "postgresql": SqlKeyStore}


def open_store(url: str) -> SqlKeyStore:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme not in STORES:
        raise ValueError(f"keys.url '{url}': no key store for '{scheme}'; use one of {sorted(STORES)}")
    if url.startswith("postgresql://"):  # SQLAlchemy 2.1 defaults to psycopg 3; the project installs psycopg2
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    try:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError as e:
        raise ValueError(f"keys.url: not a database URL ({e}); e.g. sqlite:///keys.db") from None
    try:
        return STORES[scheme](url)
    except sa.exc.OperationalError as e:  # one line naming the database, never a traceback
        raise ConnectionError(f"keys.url {shown}: cannot open the keys database: {str(e.orig).strip()}") from None
