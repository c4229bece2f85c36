"""The server's side of vector stores: uploads, stores and searches off the event loop, and file ingestion on one
background thread.

Attaching a file answers at once with status `in_progress`; the ingest thread then chunks, embeds and indexes it
(`VectorStore.add_file` commits each file atomically) and the status becomes `completed` or `failed`. Files that
wait for the thread are tracked here (`_pending`, and durably in `IngestQueue`), so a client polling the file sees
`in_progress` from the start, and a restart resumes what was queued.
Searches run on their own small pool, and see only committed files (`SearchResult.incomplete` says if some are
still ingesting).
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from freehold.errors import InvalidRequestError
from freehold.kernels import native
from freehold.retrieval.chunking import ChunkingStrategy
from freehold.retrieval.manager import StoreManager
from freehold.retrieval.records import FileCounts, FileInput, FileRecord, FileStatus, StoreNotFoundError
from freehold.retrieval.store import Embedding
from freehold.retrieval.uploads import UploadStore
from freehold.server.errors import APIError
from freehold.sqlite_wal import connect_wal

T = TypeVar("T")
log = logging.getLogger("freehold.server")


MAX_QUEUED_FILES = 256  # attached files waiting for the ingest thread; more get 503 + Retry-After


class IngestQueue:
    """The attached files not yet ingested, in SQLite, so that a restart resumes them: a file the API showed as
    `in_progress` is ingested after a crash too (or, if its ingest had begun, the store marks it failed)."""

    def __init__(self, path: Path):
        self._conn = connect_wal(path)
        self._conn.execute("CREATE TABLE IF NOT EXISTS queue (store_id TEXT, file_id TEXT, record TEXT, "
                           "PRIMARY KEY (store_id, file_id))")
        self._lock = threading.Lock()

    def put(self, store_id: str, record: FileRecord) -> None:
        value = json.dumps({"filename": record.filename, "attributes": record.attributes,
                            "created_at": record.created_at, "chunking": record.chunking.to_request()})
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO queue VALUES (?, ?, ?)", (store_id, record.file_id, value))

    def remove(self, store_id: str, file_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM queue WHERE store_id = ? AND file_id = ?", (store_id, file_id))

    def all(self) -> list[tuple[str, FileRecord]]:
        with self._lock:
            rows = self._conn.execute("SELECT store_id, file_id, record FROM queue ORDER BY rowid").fetchall()
        out = []
        for store_id, file_id, value in rows:
            v = json.loads(value)
            out.append((store_id, FileRecord(file_id, v["filename"], FileStatus.IN_PROGRESS, None, v["attributes"], 0,
                                             v["created_at"], ChunkingStrategy.from_request(v["chunking"]))))
        return out

    def close(self) -> None:
        self._conn.close()


class Retrieval:
    def __init__(self, data_dir: str | Path, embedder: Embedding):
        self.data_dir = Path(data_dir)
        self.stores = StoreManager(self.data_dir / "vector_stores", embedder)
        self.uploads = UploadStore(self.data_dir)
        self._queue = IngestQueue(self.data_dir / "ingest_queue.sqlite")
        self._search = ThreadPoolExecutor(2, thread_name_prefix="freehold-search")
        self._pending: dict[tuple[str, str], FileRecord] = {}  # (store, file) -> in_progress, waiting to ingest
        self._lock = threading.Lock()
        self._active: tuple[str, str] | None = None  # (store, file) the ingest thread is adding now
        self._work: queue.Queue[tuple[str, FileRecord] | None] = queue.Queue()
        # a daemon thread: shutdown does not wait for an ingest (an interrupted file is never half-committed)
        threading.Thread(target=self._ingest_loop, name="freehold-ingest", daemon=True).start()
        self._resume()

    async def run(self, fn: Callable[[], T]) -> T:
        """Store reads and searches (SQLite, BM25, an embedding of the query) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._search, fn)

    def attach(self, store_id: str, file_id: str, attributes: dict[str, Any] | None,
               chunking: ChunkingStrategy) -> FileRecord:
        """Queue `file_id` for ingestion into `store_id`; its record, `in_progress` (errors that need no embedding,
        such as an unknown store or file, a file that is not text, or bad attributes, raise here)."""
        self.stores.open(store_id)
        upload = self.uploads.get(file_id)
        text = self.uploads.text(file_id)  # read again by the ingest thread: the queue holds no text
        FileInput(file_id, upload.filename, text, dict(attributes or {}), chunking)  # checks the attributes now
        record = FileRecord(file_id, upload.filename, FileStatus.IN_PROGRESS, None, dict(attributes or {}), 0,
                            int(time.time()), chunking)
        with self._lock:
            if (store_id, file_id) in self._pending or self._has(store_id, file_id):
                raise InvalidRequestError(f"file {file_id} is already in vector store {store_id}", param="file_id")
            if len(self._pending) >= MAX_QUEUED_FILES:
                raise APIError(503, f"{len(self._pending)} files are already waiting to be ingested; retry later",
                               code="ingest_queue_full", headers={"Retry-After": "5"})
            self._pending[(store_id, file_id)] = record
            self._queue.put(store_id, record)
        self._work.put((store_id, record))
        return record

    def detach(self, store_id: str, file_id: str) -> None:
        """Remove `file_id` from `store_id`: a file still waiting for the ingest thread leaves the queue (it is
        never added); one being added is deleted once its ingest ends (the store's write lock)."""
        with self._lock:
            if (store_id, file_id) in self._pending and self._active != (store_id, file_id):
                del self._pending[(store_id, file_id)]
                self._queue.remove(store_id, file_id)
                return
        self.stores.delete_file(store_id, file_id)

    def file(self, store_id: str, file_id: str) -> FileRecord:
        with self._lock:
            pending = self._pending.get((store_id, file_id))
        return pending if pending is not None else self.stores.get_file(store_id, file_id)

    def files(self, store_id: str) -> list[FileRecord]:
        stored = self.stores.list_files(store_id)
        with self._lock:
            pending = [r for (s, f), r in self._pending.items() if s == store_id]
        seen = {r.file_id for r in stored}
        return stored + [r for r in pending if r.file_id not in seen]

    def file_counts(self, store_id: str, counts: FileCounts) -> FileCounts:
        """`counts` (the store's own) with the files still waiting for the ingest thread; the file being added is
        counted once (the store has it, in_progress, once its ingest began). Reads the store: call off the loop."""
        with self._lock:
            waiting = [f for s, f in self._pending if s == store_id]
            active = self._active
        if active is not None and active[0] == store_id and active[1] in waiting and self._has(*active):
            waiting.remove(active[1])
        return FileCounts(counts.in_progress + len(waiting), counts.completed, counts.failed)

    def close(self) -> None:
        """Stop taking work. A file being ingested is not waited for: it was never committed, and the next start
        marks it failed; queued files stay queued and are ingested after the next start."""
        self._work.put(None)
        self._search.shutdown(wait=False, cancel_futures=True)

    # -- private --------------------------------------------------------------------------------------------
    def _has(self, store_id: str, file_id: str) -> bool:
        try:
            self.stores.get_file(store_id, file_id)
            return True
        except StoreNotFoundError:
            return False

    def _resume(self) -> None:
        """Queue again what the last run left queued, unless the store has the file by now (its ingest had
        begun: the store marked it failed on open) or the store is gone."""
        for store_id, record in self._queue.all():
            try:
                if not self._has(store_id, record.file_id):
                    self._pending[(store_id, record.file_id)] = record
                    self._work.put((store_id, record))
                    continue
            except StoreNotFoundError:
                pass
            self._queue.remove(store_id, record.file_id)

    def _ingest_loop(self) -> None:
        while (item := self._work.get()) is not None:
            self._add(*item)
            if self._work.empty():  # idle: its OpenMP workers would slow the engine's (kernels/native.py)
                native.release_openmp_threads()

    def _add(self, store_id: str, record: FileRecord) -> None:
        key = (store_id, record.file_id)
        with self._lock:
            if self._pending.get(key) is not record:  # detached while it waited (maybe attached again since)
                return
            self._active = key
        try:
            text = self.uploads.text(record.file_id)
            self.stores.add_file(store_id, record.file_id, record.filename, text, record.attributes,
                                 record.chunking)
        except Exception:  # the store recorded the failure (status failed, with the error) if it got that far
            log.exception("ingest of %s into %s failed", record.file_id, store_id)
        finally:
            with self._lock:
                self._pending.pop(key, None)
                self._queue.remove(store_id, record.file_id)
                self._active = None
