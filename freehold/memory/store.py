"""`ConversationStore`: stored responses and conversations in one SQLite file (WAL), e.g. DATA_DIR/conversations.sqlite.

    conversations  id, created_at, metadata
    items          every stored item, in the order stored (seq): a conversation's items (conversation_id), a
                   response's input and output items (response_id, is_output), or both for a turn in a conversation
    responses      the response object of each stored response, the response it continued, its conversation and
                   the last conversation item it saw (context_seq)
    unstored       ids of responses made with store=false (nothing else of them), so that continuing one is a
                   clear "not stored" rather than "not found"

A turn commits in one transaction (`commit_turn`): its input items, its output items and its response record
together. A process killed before that transaction leaves nothing of the turn (SQLite rolls an open transaction
back), so after a restart a conversation holds exactly the turns committed. Every other write (create, add items,
delete) is one transaction too.

Limits (`StoreLimits`): a conversation, or a chain of responses linked by previous_response_id, holds at most
`max_items` items and `max_bytes` of item JSON. Adding items past them is refused; a turn is checked before it runs
(`check_room`) and its output then always commits (a conversation may end up to one turn's output over).

Item ids are unique within a conversation (adding a second item with an id the conversation holds is refused).
Threads: one connection, one lock; every call is short. Other processes may open the same file: SQLite serializes
their transactions, so each turn's items stay together, in commit order.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from freehold.errors import InvalidRequestError, NotFoundError
from freehold.sqlite_wal import connect_wal, transaction

FILENAME = "conversations.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, conversation_id TEXT,
    response_id TEXT, is_output INTEGER NOT NULL, body TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS items_of_conversation ON items (conversation_id, id)
    WHERE conversation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_of_response ON items (response_id) WHERE response_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, previous_response_id TEXT,
    conversation_id TEXT, context_seq INTEGER, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS unstored (id TEXT PRIMARY KEY);
"""
Item = dict[str, Any]  # an OpenAI Responses API item, with an "id"


@dataclass(frozen=True)
class StoreLimits:
    max_items: int = 1000  # items in one conversation, or in one previous_response_id chain
    max_bytes: int = 16 << 20  # their JSON text

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_bytes < 1:
            raise ValueError(f"store limits must be positive, got {self}")


@dataclass(frozen=True)
class Conversation:
    id: str
    created_at: int
    metadata: dict[str, str]
    num_items: int
    num_bytes: int


@dataclass(frozen=True)
class Turn:
    """What one model turn commits, in one transaction. `response` None: a turn with no response record (as
    `freehold chat --session` stores one); then `conversation_id` is required."""

    input_items: Sequence[Item]
    output_items: Sequence[Item]
    response_id: str | None = None
    response: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))


class _ResponseRow(NamedTuple):
    id: str
    previous_response_id: str | None
    conversation_id: str | None
    context_seq: int | None  # the last conversation item the response saw
    body: str


class ConversationTooLargeError(InvalidRequestError):
    """A conversation or response chain would pass `StoreLimits`: HTTP 400."""


class NotStoredError(InvalidRequestError):
    """A response made with store=false: its id is known, its content was never kept (HTTP 400)."""


class ConversationStore:
    def __init__(self, path: str | Path, limits: StoreLimits = StoreLimits()):
        self.path = Path(path)
        self.limits = limits
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect_wal(self.path)
        self._lock = threading.Lock()
        with self._transaction() as conn:
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)

    # ---- conversations ----------------------------------------------------------------------------------------
    def create_conversation(self, metadata: dict[str, str] | None = None,
                            items: Sequence[Item] = ()) -> Conversation:
        conversation_id = f"conv_{uuid.uuid4().hex}"
        with self._transaction() as conn:
            conn.execute("INSERT INTO conversations VALUES (?, ?, ?)",
                         (conversation_id, int(time.time()), json.dumps(metadata or {})))
            self._insert_items(conn, items, conversation_id=conversation_id)
            self._check_size(conn, conversation_id)
        return self.get_conversation(conversation_id)

    def get_conversation(self, conversation_id: str) -> Conversation:
        with self._lock:
            return self._conversation(self._conn, conversation_id)

    def find_conversation(self, key: str, value: str) -> Conversation | None:
        """The oldest conversation whose metadata maps `key` to `value`."""
        with self._lock:
            row = self._conn.execute("SELECT id FROM conversations WHERE json_extract(metadata, ?) = ? "
                                     "ORDER BY created_at, rowid LIMIT 1", (f'$."{key}"', value)).fetchone()
            return None if row is None else self._conversation(self._conn, row[0])

    def find_or_create_conversation(self, key: str, value: str) -> Conversation:
        """The oldest conversation whose metadata maps `key` to `value`, created with just that metadata if none
        does, in one transaction: two processes opening the same name get the same conversation."""
        with self._transaction() as conn:
            row = conn.execute("SELECT id FROM conversations WHERE json_extract(metadata, ?) = ? "
                               "ORDER BY created_at, rowid LIMIT 1", (f'$."{key}"', value)).fetchone()
            conversation_id = row[0] if row is not None else f"conv_{uuid.uuid4().hex}"
            if row is None:
                conn.execute("INSERT INTO conversations VALUES (?, ?, ?)",
                             (conversation_id, int(time.time()), json.dumps({key: value})))
        return self.get_conversation(conversation_id)

    def set_metadata(self, conversation_id: str, metadata: dict[str, str]) -> Conversation:
        with self._transaction() as conn:
            self._conversation(conn, conversation_id)
            conn.execute("UPDATE conversations SET metadata = ? WHERE id = ?", (json.dumps(metadata), conversation_id))
        return self.get_conversation(conversation_id)

    def delete_conversation(self, conversation_id: str) -> None:
        """The conversation and its items; items that are also a stored response's stay that response's."""
        with self._transaction() as conn:
            self._conversation(conn, conversation_id)
            conn.execute("DELETE FROM items WHERE conversation_id = ? AND response_id IS NULL", (conversation_id,))
            conn.execute("UPDATE items SET conversation_id = NULL WHERE conversation_id = ?", (conversation_id,))
            conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def add_items(self, conversation_id: str, items: Sequence[Item]) -> None:
        with self._transaction() as conn:
            self._conversation(conn, conversation_id)
            self._insert_items(conn, items, conversation_id=conversation_id)
            self._check_size(conn, conversation_id)

    def items(self, conversation_id: str) -> list[Item]:
        """Every item of the conversation, oldest first."""
        with self._lock:
            self._conversation(self._conn, conversation_id)
            rows = self._conn.execute("SELECT body FROM items WHERE conversation_id = ? ORDER BY seq",
                                      (conversation_id,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def get_item(self, conversation_id: str, item_id: str) -> Item:
        with self._lock:
            self._conversation(self._conn, conversation_id)
            row = self._conn.execute("SELECT body FROM items WHERE conversation_id = ? AND id = ?",
                                     (conversation_id, item_id)).fetchone()
        if row is None:
            raise NotFoundError(f"no item {item_id!r} in conversation {conversation_id!r}", param="item_id")
        return json.loads(row[0])

    def delete_item(self, conversation_id: str, item_id: str) -> None:
        """Out of the conversation; an item that is also a stored response's stays that response's."""
        with self._transaction() as conn:
            self._conversation(conn, conversation_id)
            where = "conversation_id = ? AND id = ?"
            if conn.execute(f"SELECT 1 FROM items WHERE {where}", (conversation_id, item_id)).fetchone() is None:
                raise NotFoundError(f"no item {item_id!r} in conversation {conversation_id!r}", param="item_id")
            conn.execute(f"DELETE FROM items WHERE {where} AND response_id IS NULL", (conversation_id, item_id))
            conn.execute(f"UPDATE items SET conversation_id = NULL WHERE {where}", (conversation_id, item_id))

    def check_room(self, num_items: int, num_bytes: int, what: str) -> None:
        """ConversationTooLargeError if `num_items` items of `num_bytes` bytes pass the limits."""
        if num_items > self.limits.max_items or num_bytes > self.limits.max_bytes:
            raise ConversationTooLargeError(
                f"{what} would hold {num_items} items ({num_bytes} bytes of JSON), over Freehold's limit of "
                f"{self.limits.max_items} items and {self.limits.max_bytes} bytes: start a new conversation")

    # ---- responses --------------------------------------------------------------------------------------------
    def commit_turn(self, turn: Turn) -> None:
        """The turn's input and output items and its response record, in one transaction."""
        if turn.response is None and turn.conversation_id is None:
            raise ValueError("a turn without a response record must belong to a conversation")
        with self._transaction() as conn:
            context_seq = None
            if turn.conversation_id is not None:
                self._conversation(conn, turn.conversation_id)
                context_seq = conn.execute("SELECT MAX(seq) FROM items WHERE conversation_id = ?",
                                           (turn.conversation_id,)).fetchone()[0]
            own = {"conversation_id": turn.conversation_id, "response_id": turn.response_id}
            self._insert_items(conn, turn.input_items, **own)
            self._insert_items(conn, turn.output_items, is_output=True, **own)
            if turn.response is not None:
                conn.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                             (turn.response_id, turn.created_at, turn.previous_response_id, turn.conversation_id,
                              context_seq, json.dumps(turn.response)))

    def record_unstored(self, response_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO unstored VALUES (?)", (response_id,))

    def get_response(self, response_id: str) -> dict[str, Any]:
        with self._lock:
            return json.loads(self._response(self._conn, response_id).body)

    def delete_response(self, response_id: str) -> None:
        """The response and its items (those also in a conversation stay there)."""
        with self._transaction() as conn:
            self._response(conn, response_id)
            conn.execute("DELETE FROM items WHERE response_id = ? AND conversation_id IS NULL", (response_id,))
            conn.execute("UPDATE items SET response_id = NULL WHERE response_id = ?", (response_id,))
            conn.execute("DELETE FROM responses WHERE id = ?", (response_id,))

    def continued_items(self, response_id: str) -> list[Item]:
        """What a response continuing `response_id` sees before its own input: the input and output items of that
        response and of the ones it continued in turn, oldest first. (A deleted response ends the chain.)"""
        with self._lock:
            chain = self._chain(response_id)
            marks = ",".join("?" * len(chain))
            rows = self._conn.execute(f"SELECT body FROM items WHERE response_id IN ({marks}) ORDER BY seq",
                                      chain).fetchall()
        return [json.loads(r[0]) for r in rows]

    def input_items(self, response_id: str) -> list[Item]:
        """The items the response was made from, oldest first: what it continued (the earlier chain, or the
        conversation's items as they stood, less those deleted since: a deleted response's items are gone) and its
        own input."""
        with self._lock:
            row = self._response(self._conn, response_id)
        previous = row.previous_response_id
        before: list[Item] = []
        if previous is not None and row.conversation_id is None:
            try:
                before = self.continued_items(previous)
            except NotFoundError:  # the response it continued was deleted since: its items are gone with it
                before = []
        with self._lock:
            rows = self._conn.execute(
                "SELECT body FROM items WHERE (response_id = ? AND is_output = 0) "
                "OR (conversation_id = ? AND seq <= ?) ORDER BY seq",
                (response_id, row.conversation_id, -1 if row.context_seq is None else row.context_seq)).fetchall()
        return before + [json.loads(r[0]) for r in rows]

    def check_integrity(self) -> None:
        """Every item belongs to a live conversation or response; every stored response names one that exists or
        none; AssertionError naming the first problem."""
        with self._lock:
            conn = self._conn
            orphan = conn.execute("SELECT seq FROM items WHERE (conversation_id IS NULL OR conversation_id NOT IN "
                                  "(SELECT id FROM conversations)) AND (response_id IS NULL OR response_id NOT IN "
                                  "(SELECT id FROM responses))").fetchone()
            assert orphan is None, f"item seq {orphan[0]} belongs to nothing"
            stale = conn.execute("SELECT seq FROM items WHERE conversation_id IS NOT NULL AND conversation_id NOT IN "
                                 "(SELECT id FROM conversations)").fetchone()
            assert stale is None, f"item seq {stale[0]} names a deleted conversation"
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- private ----------------------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn) as conn:
            yield conn

    def _conversation(self, conn: sqlite3.Connection, conversation_id: str) -> Conversation:
        row = conn.execute("SELECT created_at, metadata FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no conversation with id {conversation_id!r}", param="conversation_id")
        num_items, num_bytes = self._size(conn, conversation_id)
        return Conversation(conversation_id, row[0], json.loads(row[1]), num_items, num_bytes)

    def _response(self, conn: sqlite3.Connection, response_id: str) -> _ResponseRow:
        row = conn.execute("SELECT id, previous_response_id, conversation_id, context_seq, body FROM responses "
                           "WHERE id = ?", (response_id,)).fetchone()
        if row is not None:
            return _ResponseRow(*row)
        if conn.execute("SELECT 1 FROM unstored WHERE id = ?", (response_id,)).fetchone() is not None:
            raise NotStoredError(f"the response {response_id!r} was made with store=false: it was not stored, so "
                                 "it cannot be retrieved or continued", param="response_id")
        raise NotFoundError(f"no stored response with id {response_id!r}", param="response_id")

    def _chain(self, response_id: str) -> list[str]:
        """`response_id` and the responses it continued, newest first (NotFoundError if the first is missing)."""
        chain = [self._response(self._conn, response_id).id]
        seen = set(chain)
        while True:
            row = self._conn.execute("SELECT previous_response_id FROM responses WHERE id = ?",
                                     (chain[-1],)).fetchone()
            previous = row[0] if row is not None else None
            if previous is None or previous in seen:
                return chain
            if self._conn.execute("SELECT 1 FROM responses WHERE id = ?", (previous,)).fetchone() is None:
                return chain
            chain.append(previous)
            seen.add(previous)

    def _insert_items(self, conn: sqlite3.Connection, items: Sequence[Item], conversation_id: str | None = None,
                      response_id: str | None = None, is_output: bool = False) -> None:
        for item in items:
            try:
                conn.execute("INSERT INTO items (id, conversation_id, response_id, is_output, body) "
                             "VALUES (?, ?, ?, ?, ?)", (item["id"], conversation_id, response_id, int(is_output),
                                                        json.dumps(item, ensure_ascii=False)))
            except sqlite3.IntegrityError:
                raise InvalidRequestError(f"the conversation already holds an item with id {item['id']!r}",
                                          param="items") from None

    def _size(self, conn: sqlite3.Connection, conversation_id: str) -> tuple[int, int]:
        row = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(body AS BLOB))), 0) FROM items "
                           "WHERE conversation_id = ?", (conversation_id,)).fetchone()
        return int(row[0]), int(row[1])

    def _check_size(self, conn: sqlite3.Connection, conversation_id: str) -> None:
        self.check_room(*self._size(conn, conversation_id), f"the conversation {conversation_id!r}")


def item_bytes(items: Sequence[Item]) -> int:
    """The JSON size of `items` as the store counts it."""
    return sum(len(json.dumps(item, ensure_ascii=False).encode()) for item in items)
