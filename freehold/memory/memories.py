"""`MemoryStore`: explicit long-term memories per namespace, and each conversation's context state, in the same
SQLite file as the conversations (DATA_DIR/conversations.sqlite, WAL; its own connection and tables).

    memories       id, namespace, created_at, text: what /v1/memories adds, lists and deletes
    context_state  per conversation (or response chain): the running summary, the last turn it covers, and the
                   recent window's first turn (the anchor that keeps consecutive prompts' prefixes equal)

Every write is one transaction. Threads: one connection, one lock; every call is short.
"""
from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from freehold.errors import InvalidRequestError, NotFoundError
from freehold.memory.context import Summary
from freehold.sqlite_wal import connect_wal, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (id TEXT PRIMARY KEY, namespace TEXT NOT NULL, created_at INTEGER NOT NULL,
    text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS memories_of_namespace ON memories (namespace, created_at);
CREATE TABLE IF NOT EXISTS context_state (key TEXT PRIMARY KEY, summary TEXT, summary_through TEXT, anchor TEXT);
"""
MAX_MEMORY_CHARS = 4000
MAX_MEMORIES = 10_000  # per namespace
MAX_NAMESPACE_CHARS = 64


@dataclass(frozen=True)
class Memory:
    id: str
    namespace: str
    created_at: int
    text: str


@dataclass(frozen=True)
class ContextState:
    summary: Summary | None = None
    anchor: str | None = None


class MemoryStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect_wal(self.path)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(SCHEMA)

    # ---- memories -----------------------------------------------------------------------------------------------
    def add(self, namespace: str, text: str) -> Memory:
        check_namespace(namespace)
        if not text.strip() or len(text) > MAX_MEMORY_CHARS:
            raise InvalidRequestError(f"a memory's text must be 1 to {MAX_MEMORY_CHARS} characters, got {len(text)}",
                                      param="text")
        memory = Memory(f"mem_{uuid.uuid4().hex}", namespace, int(time.time()), text)
        with self._lock, transaction(self._conn) as conn:
            (num,) = conn.execute("SELECT COUNT(*) FROM memories WHERE namespace = ?", (namespace,)).fetchone()
            if num >= MAX_MEMORIES:
                raise InvalidRequestError(f"the namespace {namespace!r} already holds {MAX_MEMORIES} memories, "
                                          "Freehold's limit: delete some first", param="namespace")
            conn.execute("INSERT INTO memories VALUES (?, ?, ?, ?)", (memory.id, namespace, memory.created_at, text))
        return memory

    def list(self, namespace: str) -> list[Memory]:
        """The namespace's memories, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT id, namespace, created_at, text FROM memories WHERE namespace = ? "
                                      "ORDER BY created_at, rowid", (namespace,)).fetchall()
        return [Memory(*row) for row in rows]

    def delete(self, memory_id: str) -> Memory:
        with self._lock:
            row = self._conn.execute("SELECT id, namespace, created_at, text FROM memories WHERE id = ?",
                                     (memory_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no memory with id {memory_id!r}", param="memory_id")
            self._conn.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
        return Memory(*row)

    # ---- context state ------------------------------------------------------------------------------------------
    def context_state(self, key: str) -> ContextState:
        with self._lock:
            row = self._conn.execute("SELECT summary, summary_through, anchor FROM context_state WHERE key = ?",
                                     (key,)).fetchone()
        if row is None:
            return ContextState()
        summary = Summary(row[0], row[1]) if row[0] is not None and row[1] is not None else None
        return ContextState(summary, row[2])

    def set_anchor(self, key: str, anchor: str | None) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO context_state (key, anchor) VALUES (?, ?) "
                               "ON CONFLICT (key) DO UPDATE SET anchor = excluded.anchor", (key, anchor))

    def set_summary(self, key: str, summary: Summary) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO context_state (key, summary, summary_through) VALUES (?, ?, ?) "
                               "ON CONFLICT (key) DO UPDATE SET summary = excluded.summary, "
                               "summary_through = excluded.summary_through", (key, summary.text, summary.through))

    def copy_state(self, source: str, target: str) -> None:
        """A response continuing `source` starts from its state (previous_response_id chains)."""
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO context_state SELECT ?, summary, summary_through, anchor "
                               "FROM context_state WHERE key = ?", (target, source))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


DEFAULT_NAMESPACE = "default"  # where /v1/memories puts a memory given none, and what a turn recalls by default


def check_namespace(namespace: str) -> None:
    if not namespace or len(namespace) > MAX_NAMESPACE_CHARS:
        raise InvalidRequestError(f"namespace must be 1 to {MAX_NAMESPACE_CHARS} characters, got {namespace!r}",
                                  param="namespace")
