"""Helpers for the tests that kill a tuning worker: Optuna's stale-trial check without waiting out its clock."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def age_running_heartbeats(db: Path) -> int:
    """Move every RUNNING trial an hour back in the study DB (instead of sleeping past the grace period): its last
    heartbeat, and its start for a trial killed before its first beat, so the next worker fails them as stale.
    Returns how many RUNNING trials there were (a completed trial keeps its last heartbeat row too, hence the RUNNING
    filter)."""
    running = "SELECT trial_id FROM trials WHERE state = 'RUNNING'"
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') WHERE trial_id IN ({running})")
        conn.execute(f"UPDATE trials SET datetime_start = datetime(datetime_start, '-1 hour') WHERE trial_id IN ({running})")
        return len(conn.execute(running).fetchall())
