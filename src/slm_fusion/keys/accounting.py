"""Per-process key accounting: who a bearer key is, whether its budget admits one more request, and the usage
ledger written in batches off the request path.

Nothing here touches the database on a request. Key records and the totals of the current budget windows are held
in memory and refreshed from the database every `keys.flush_interval_s`, right after this process's ledger rows of
that interval are written (one transaction: rows + window totals). A request is admitted against
  last known database totals (every replica, as of the last flush)
  + rows this process recorded since (not yet read back)
  + this process's requests still in flight (requests budget only: their tokens are not known yet).
So one process enforces a budget exactly for requests and to within one request's tokens; several replicas
sharing a database see each other's usage at most one flush interval late, and a key created or revoked with
`slm-fusion keys` takes effect within one flush interval. A crash loses at most the rows of the last interval;
a clean shutdown flushes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from slm_fusion.errors import BudgetExceeded, PermissionDenied
from slm_fusion.keys.store import KeyRecord, KeyStore, UsageRow, hash_secret, open_store

log = logging.getLogger("slm_fusion.keys")


class KeyAccounting:
    def __init__(self, store: KeyStore, flush_interval_s: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self.by_hash: dict[str, KeyRecord] = {}
        self.db: dict[tuple[str, int], tuple[int, int]] = {}  # (key, window) -> (requests, tokens) as last read
        self.unread: defaultdict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])  # recorded, not read back
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.rows: list[UsageRow] = []
        self.refreshes = 0  # completed flush + refresh rounds (tests wait on it)
        self._pending: defaultdict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])  # of self.rows
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    def from_url(cls, url: str, flush_interval_s: float) -> KeyAccounting:
        return cls(open_store(url), flush_interval_s)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._flush_loop())

    async def aclose(self) -> None:
        """Stop the loop after its last flush (never cancelled mid-write: a cancelled write could be sent twice)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        else:
            await self.flush()
        self.store.close()

    # -- the request path: memory only ------------------------------------------------------------------------------

    def lookup(self, presented: bytes) -> KeyRecord | None:
        return self.by_hash.get(hash_secret(presented))

    def admit(self, key: KeyRecord) -> BudgetExceeded | None:
        """None and the request counted in flight, or the 429 that says which budget is spent."""
        now = self.clock()
        window = key.window(now)
        db_requests, db_tokens = self.db.get((key.id, window), (0, 0))
        unread = self.unread.get((key.id, window), (0, 0))
        pending = self._pending.get((key.id, window), (0, 0))
        resets = window + key.period_s
        if key.max_requests is not None:
            used = db_requests + unread[0] + pending[0] + self.in_flight[key.id]
            if used >= key.max_requests:
                return BudgetExceeded(key.name, "requests", key.max_requests, key.period, resets, now)
        if key.max_tokens is not None and db_tokens + unread[1] + pending[1] >= key.max_tokens:
            return BudgetExceeded(key.name, "tokens", key.max_tokens, key.period, resets, now)
        self.in_flight[key.id] += 1
        return None

    @staticmethod
    def check_model(key: KeyRecord, model: str) -> None:
        if key.models is not None and model not in key.models:
            raise PermissionDenied(f"this API key ('{key.name}') may not use model '{model}'; it may use: "
                                   f"{', '.join(key.models)} (`slm-fusion keys create --model`)", param="model")

    def record(self, key: KeyRecord, row: UsageRow) -> None:
        """The request finished (any status): one ledger row, written at the next flush."""
        self.in_flight[key.id] -= 1
        self.rows.append(row)
        counts = self._pending[(key.id, key.window(row.ts))]
        counts[0] += 1
        counts[1] += row.tokens

    # -- off the request path ---------------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # a database outage must not stop the loop: the rows are kept and retried
                log.exception("keys: flushing the usage ledger failed; retrying in %ss", self.flush_interval_s)

    async def flush(self) -> None:
        """Write the rows recorded since the last flush, then re-read keys and window totals."""
        async with self._lock:
            rows, self.rows = self.rows, []
            increments, self._pending = self._pending, defaultdict(lambda: [0, 0])
            for k, (requests, tokens) in increments.items():  # counted as unread until the totals are read back
                self.unread[k][0] += requests
                self.unread[k][1] += tokens
            try:
                await asyncio.to_thread(self.store.write, rows, {k: tuple(v) for k, v in increments.items()})
            except Exception:
                self.rows[:0] = rows  # written next time, with their increments (still counted in unread)
                for k, v in increments.items():
                    self._pending[k][0] += v[0]
                    self._pending[k][1] += v[1]
                    self.unread[k][0] -= v[0]
                    self.unread[k][1] -= v[1]
                raise
            await self._read()

    async def refresh(self) -> None:
        async with self._lock:
            await self._read()

    async def _read(self) -> None:
        keys = await asyncio.to_thread(self.store.keys_with_hashes)
        oldest = min((k.window(self.clock()) for k, _ in keys), default=int(self.clock()))
        totals = await asyncio.to_thread(self.store.windows, oldest)
        self.by_hash = {h: k for k, h in keys}
        self.db = totals
        self.unread = defaultdict(lambda: [0, 0])
        self.refreshes += 1
