"""Helpers for the tests that kill a tuning worker: Optuna's stale-trial check without waiting out its clock."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def age_running_heartbeats(db: Path) -> int:
    """Move the last heartbeat of every RUNNING trial an hour back in the study DB (instead of sleeping past the
    grace period), so the next worker fails them as stale. Returns how many were moved (a completed trial keeps its
    last heartbeat row too, hence the RUNNING filter)."""
    with sqlite3.connect(db) as conn:
        return conn.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') WHERE trial_id IN "
                            "(SELECT trial_id FROM trials WHERE state = 'RUNNING')").rowcount
