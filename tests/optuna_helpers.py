"""Helpers for the tests that kill a tuning worker: Optuna's stale-trial check without waiting out its clock."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

RUNNING_WITH_A_BEAT = ("SELECT count(*) FROM trials t WHERE t.state = 'RUNNING' "
                       "AND EXISTS (SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id) "
                       "AND EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)")


def wait_for_a_running_trial(db: Path, proc: subprocess.Popen, timeout_s: float = 300, poll_s: float = 0.5) -> None:
    """Return once the worker `proc` has a RUNNING trial with parameters drawn and a heartbeat, read from the study DB
    with plain sqlite3 (opening it through Optuna would race the child creating tables); fail if `proc` exits or the
    deadline passes. The poll interval is how often another process is looked at, not a stand-in for a clock."""
    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        assert time.time() < deadline, f"no RUNNING trial with a heartbeat in {db} after {timeout_s} s"
        time.sleep(poll_s)
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    if conn.execute(RUNNING_WITH_A_BEAT).fetchone()[0]:
                        return
            except sqlite3.Error:  # the child may be creating the tables right now
                pass


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
