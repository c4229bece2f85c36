"""SQLite files in WAL mode, opened safely by several threads or processes at once (every durable store uses this).

Switching a new file to WAL needs a moment alone with it, and SQLite answers "database is locked" at once (without
its busy timeout) when another connection opens the same new file then: `connect_wal` retries the switch until
BUSY_TIMEOUT_S, and its connections wait that long for a lock before failing a statement. `transaction` is how the
stores write more than one statement at a time.
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BUSY_TIMEOUT_S = 30.0


def connect_wal(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any thread, in WAL mode with
    synchronous=FULL (SQLite syncs the WAL to disk at every commit, so a commit is durable beyond a killed process;
    the tests check kill -9, not power loss)."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    conn.execute("PRAGMA synchronous=FULL")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock taken at the start, not at the first write) ... COMMIT; any exception rolls it
    back, a failed COMMIT too (it leaves the transaction open; SQLite ends some failures itself)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
