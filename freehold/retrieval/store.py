"""`VectorStore`: one durable vector store in one directory.

    store.sqlite     (WAL) meta, files (status, attributes), chunks (text and float32 vector): the truth
    bm25-<gen>/, dense-<gen>.usearch     index caches derived from it (freehold/retrieval/indexes.py)
    write.lock       held (flock) by the one process writing

Ingest commits atomically per call: the files are first recorded `in_progress` (committed, so searches can say
that something is pending), then chunked and embedded, then one SQLite transaction inserts every chunk, marks the
files `completed` (or `failed`, with the error) and bumps the store's generation. A process killed before that
transaction leaves no chunk behind (SQLite rolls the open transaction back); the next process to open the store
with the write lock free marks such leftover `in_progress` files `failed` ("interrupted"). Searches read only the
indexes of a committed generation, and chunk rows of completed files.

Threads: one writer at a time per store (a lock, plus a file lock across processes); searches run concurrently
and see the snapshot committed when they started (IndexSnapshot is replaced whole).
"""
from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np

from freehold.errors import FreeholdError, InvalidRequestError
from freehold.retrieval import indexes
from freehold.retrieval.chunking import ChunkingStrategy, TokenCodec, chunk_text
from freehold.retrieval.dense import DenseIndex
from freehold.retrieval.filters import Filter, check_known_keys, parse_filter
from freehold.retrieval.fusion import reciprocal_rank_fusion
from freehold.retrieval.records import (FileCounts, FileInput, FileRecord, FileStatus, SearchHit, SearchMode,
                                        SearchResult, StoreNotFoundError)
from freehold.sqlite_wal import connect_wal, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (file_id TEXT PRIMARY KEY, filename TEXT NOT NULL, status TEXT NOT NULL,
    error TEXT, attributes TEXT NOT NULL, num_chunks INTEGER NOT NULL, created_at INTEGER NOT NULL,
    chunking TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (chunk_id INTEGER PRIMARY KEY, file_id TEXT NOT NULL, position INTEGER NOT NULL,
    text TEXT NOT NULL, num_tokens INTEGER NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks (file_id);
"""
EMBED_BATCH = 64  # chunks per embed call (and per progress tick)
HYBRID_DEPTH = 100  # each list's candidates fused by RRF (at least max_num_results)
INTERRUPTED = "ingest interrupted: the process stopped before the file was committed"


class Embedding(TokenCodec, Protocol):
    """What a store needs from an embedder (freehold.embed.Embedder has it)."""
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> Any: ...


class VectorStore:
    def __init__(self, directory: Path, embedder: Embedding, *, create: bool = False, name: str | None = None,
                 metadata: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.embedder = embedder
        if not (self.directory / "store.sqlite").is_file():
            if not create:
                raise StoreNotFoundError(f"no vector store at {self.directory}", param="vector_store_id")
            self.directory.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._snapshot: indexes.IndexSnapshot | None = None
        self._init_schema(create, name, metadata or {})
        self._recover()

    # ---- public API -------------------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._conn().execute("SELECT key, value FROM meta")}

    def file_counts(self) -> FileCounts:
        rows = dict(self._conn().execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        return FileCounts(*(rows.get(s.value, 0) for s in FileStatus))

    def usage_bytes(self) -> int:
        row = self._conn().execute("SELECT COALESCE(SUM(LENGTH(CAST(text AS BLOB)) + LENGTH(vector)), 0) "
                                   "FROM chunks").fetchone()
        return int(row[0])

    def list_files(self) -> list[FileRecord]:
        return [_record(r) for r in self._conn().execute(f"SELECT {_FILE_COLUMNS} FROM files ORDER BY created_at")]

    def get_file(self, file_id: str) -> FileRecord:
        row = self._conn().execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE file_id = ?", (file_id,)).fetchone()
        if row is None:
            raise StoreNotFoundError(f"no file {file_id!r} in this vector store", param="file_id")
        return _record(row)

    def add_file(self, file: FileInput) -> FileRecord:
        return self.add_files([file])[0]

    def add_files(self, files: Sequence[FileInput],
                  progress: Callable[[int, int], None] | None = None) -> list[FileRecord]:
        """Chunk, embed and index `files`, committed together; `progress(chunks embedded, total)` as it goes.
        A file that cannot be chunked (no text) ends `failed`; the others still commit."""
        with self._writing():
            self._check_new(files)
            self._begin_files(files)
            try:
                chunked = {f.file_id: self._chunk(f) for f in files}
                texts = [c.text for chunks in chunked.values() if isinstance(chunks, list) for c in chunks]
                vectors = self._embed_all(texts, progress)
                keys = self._commit_files(chunked, vectors)
            except BaseException as exc:  # nothing of these files was committed: they end failed, with the reason
                self._fail_files([f.file_id for f in files], f"ingest failed: {exc}")
                raise
            self._update_indexes(added=(keys, vectors))
        return [self.get_file(f.file_id) for f in files]

    def delete_file(self, file_id: str) -> None:
        with self._writing():
            self.get_file(file_id)
            with self._transaction() as conn:
                keys = np.array([r[0] for r in conn.execute("SELECT chunk_id FROM chunks WHERE file_id = ?",
                                                            (file_id,))], np.int64)
                conn.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
                conn.execute("DELETE FROM files WHERE file_id = ?", (file_id,))
                self._bump_generation(conn)
            self._update_indexes(removed=keys)

    def search(self, query: str, mode: SearchMode | str = SearchMode.HYBRID, max_num_results: int = 10,
               filters: Filter | dict | None = None, score_threshold: float = 0.0) -> SearchResult:
        mode = _parse_mode(mode)
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("query must be a non-empty string", param="query")
        if not isinstance(max_num_results, int) or max_num_results < 1:
            raise InvalidRequestError("max_num_results must be a positive integer", param="max_num_results")
        incomplete = self.file_counts().in_progress > 0
        snapshot = self._snapshot_now()
        allowed = self._allowed_chunks(filters)
        ranked = self._rank(snapshot, query, mode, max_num_results, allowed)
        ranked = [(key, score) for key, score in ranked if score >= score_threshold][:max_num_results]
        return SearchResult(self._hits(ranked), mode, incomplete)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- ranking ----------------------------------------------------------------------------------------------

    def _rank(self, snapshot: indexes.IndexSnapshot, query: str, mode: SearchMode, k: int,
              allowed: np.ndarray | None) -> list[tuple[int, float]]:
        depth = max(k, HYBRID_DEPTH) if mode is SearchMode.HYBRID else k
        lists = []
        if mode in (SearchMode.BM25, SearchMode.HYBRID):
            lists.append(_bm25_top(snapshot, query, depth, allowed))
        if mode in (SearchMode.DENSE, SearchMode.HYBRID):
            vector = np.asarray(self.embedder.embed([query]).vectors[0], np.float32)
            hits = snapshot.dense.search(vector, depth, allowed)
            lists.append(list(zip(hits.keys.tolist(), hits.scores.tolist())))
        if mode is not SearchMode.HYBRID:
            return lists[0]
        return reciprocal_rank_fusion([[key for key, _ in ranking] for ranking in lists])

    def _allowed_chunks(self, filters: Filter | dict | None) -> np.ndarray | None:
        if filters is None:
            return None
        flt = filters if not isinstance(filters, dict) else parse_filter(filters)
        rows = self._conn().execute("SELECT file_id, attributes, status FROM files").fetchall()
        known = set().union(*(json.loads(a).keys() for _, a, _ in rows))
        check_known_keys(flt, known)
        chosen = {f for f, a, s in rows if s == FileStatus.COMPLETED.value and flt.matches(json.loads(a))}
        chunks = self._conn().execute("SELECT chunk_id, file_id FROM chunks").fetchall()
        return np.array([key for key, file_id in chunks if file_id in chosen], np.int64)

    def _hits(self, ranked: list[tuple[int, float]]) -> list[SearchHit]:
        conn, hits = self._conn(), []
        for key, score in ranked:
            row = conn.execute("SELECT c.file_id, f.filename, c.text, f.attributes FROM chunks c JOIN files f "
                               "ON c.file_id = f.file_id WHERE c.chunk_id = ? AND f.status = ?",
                               (int(key), FileStatus.COMPLETED.value)).fetchone()
            if row is not None:  # a chunk deleted since the snapshot was taken is skipped
                hits.append(SearchHit(row[0], row[1], int(key), row[2], float(score), json.loads(row[3])))
        return hits

    # ---- ingest steps -----------------------------------------------------------------------------------------

    def _check_new(self, files: Sequence[FileInput]) -> None:
        ids = [f.file_id for f in files]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("file ids must be unique within one call", param="file_id")
        placeholders = ",".join("?" * len(ids))
        taken = self._conn().execute(f"SELECT file_id FROM files WHERE file_id IN ({placeholders})", ids).fetchone()
        if taken is not None:
            raise InvalidRequestError(f"file {taken[0]!r} is already in this vector store", param="file_id")

    def _begin_files(self, files: Sequence[FileInput]) -> None:
        now = int(time.time())
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO files VALUES (?, ?, ?, NULL, ?, 0, ?, ?)",
                [(f.file_id, f.filename, FileStatus.IN_PROGRESS.value, json.dumps(f.attributes), now,
                  json.dumps(f.chunking.to_request())) for f in files])

    def _chunk(self, file: FileInput) -> list | str:
        """The file's chunks, or the reason it has none."""
        try:
            chunks = chunk_text(file.text, self.embedder, file.chunking)
        except FreeholdError as exc:
            return str(exc)
        return chunks if chunks else "the file has no text to index"

    def _embed_all(self, texts: list[str], progress: Callable[[int, int], None] | None) -> np.ndarray:
        out = np.zeros((len(texts), self.embedder.dim), np.float32)
        for start in range(0, len(texts), EMBED_BATCH):
            out[start:start + EMBED_BATCH] = self.embedder.embed(texts[start:start + EMBED_BATCH]).vectors
            if progress is not None:
                progress(min(start + EMBED_BATCH, len(texts)), len(texts))
        return out

    def _commit_files(self, chunked: dict[str, list | str], vectors: np.ndarray) -> np.ndarray:
        """One transaction: every chunk, every file's final status, the generation. Returns the new chunk ids."""
        keys, row = [], 0
        with self._transaction() as conn:
            for file_id, chunks in chunked.items():
                if isinstance(chunks, str):
                    conn.execute("UPDATE files SET status = ?, error = ? WHERE file_id = ?",
                                 (FileStatus.FAILED.value, chunks, file_id))
                    continue
                for position, chunk in enumerate(chunks):
                    cur = conn.execute("INSERT INTO chunks (file_id, position, text, num_tokens, vector) "
                                       "VALUES (?, ?, ?, ?, ?)", (file_id, position, chunk.text, chunk.num_tokens,
                                                                  vectors[row].tobytes()))
                    keys.append(cur.lastrowid)
                    row += 1
                conn.execute("UPDATE files SET status = ?, num_chunks = ? WHERE file_id = ?",
                             (FileStatus.COMPLETED.value, len(chunks), file_id))
            self._bump_generation(conn)
        return np.array(keys, np.int64)

    def _fail_files(self, file_ids: list[str], error: str) -> None:
        with self._transaction() as conn:
            conn.executemany("UPDATE files SET status = ?, error = ? WHERE file_id = ? AND status = ?",
                             [(FileStatus.FAILED.value, error, f, FileStatus.IN_PROGRESS.value) for f in file_ids])

    # ---- indexes ----------------------------------------------------------------------------------------------

    def _snapshot_now(self) -> indexes.IndexSnapshot:
        """The snapshot of the committed generation (reloaded when another process committed since)."""
        generation = self._generation()
        snapshot = self._snapshot
        if snapshot is None or snapshot.generation != generation:
            snapshot = self._load_snapshot(generation)
            self._snapshot = snapshot
        return snapshot

    def _load_snapshot(self, generation: int) -> indexes.IndexSnapshot:
        cached = indexes.load_bm25(self.directory, generation)
        bm25, bm25_keys = cached if cached is not None else indexes.build_bm25(*self._all_texts())
        dense = indexes.load_dense(self.directory, generation, self.embedder.dim)
        if dense is None:
            dense = DenseIndex(self.embedder.dim)
            dense.add(*self._all_vectors())
        return indexes.IndexSnapshot(generation, bm25, bm25_keys, dense)

    def _update_indexes(self, added: tuple[np.ndarray, np.ndarray] | None = None,
                        removed: np.ndarray | None = None) -> None:
        """After a commit (write lock held): update the dense index in place, rebuild BM25, publish the new
        snapshot, write its caches. With no snapshot of the generation just before, everything loads anew."""
        generation, old = self._generation(), self._snapshot
        if old is None or old.generation != generation - 1:
            snapshot = self._load_snapshot(generation)  # read after the commit: it holds the change already
        else:
            if added is not None:
                old.dense.add(*added)
            if removed is not None:
                old.dense.remove(removed)
            bm25, bm25_keys = indexes.build_bm25(*self._all_texts())
            snapshot = indexes.IndexSnapshot(generation, bm25, bm25_keys, old.dense)
        self._snapshot = snapshot
        indexes.save_bm25(self.directory, generation, snapshot.bm25, snapshot.bm25_keys)
        indexes.save_dense(self.directory, generation, snapshot.dense)
        indexes.remove_stale(self.directory, generation)

    def _all_texts(self) -> tuple[np.ndarray, list[str]]:
        rows = self._conn().execute("SELECT chunk_id, text FROM chunks ORDER BY chunk_id").fetchall()
        return np.array([r[0] for r in rows], np.int64), [r[1] for r in rows]

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._conn().execute("SELECT chunk_id, vector FROM chunks ORDER BY chunk_id").fetchall()
        vectors = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.embedder.dim)
        return np.array([r[0] for r in rows], np.int64), vectors

    # ---- SQLite and locks -------------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_wal(self.directory / "store.sqlite")  # WAL, synchronous FULL
            self._local.conn = conn
        return conn

    def _transaction(self) -> ContextManager[sqlite3.Connection]:
        return transaction(self._conn())

    @contextmanager
    def _writing(self) -> Iterator[None]:
        with self._write_lock, open(self.directory / "write.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _generation(self) -> int:
        return int(self._conn().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _bump_generation(self, conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def _init_schema(self, create: bool, name: str | None, metadata: dict[str, Any]) -> None:
        with self._transaction() as conn:
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            wanted = {"name": name, "created_at": int(time.time()), "embedder": self.embedder.name,
                      "dim": self.embedder.dim, "generation": 0, "metadata": metadata}
            conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in wanted.items()])
        meta = self.meta()
        if (meta["embedder"], meta["dim"]) != (self.embedder.name, self.embedder.dim):
            raise InvalidRequestError(f"the vector store at {self.directory} was built with the embedder "
                                      f"{meta['embedder']} ({meta['dim']}-d), not {self.embedder.name} "
                                      f"({self.embedder.dim}-d)", param="embedder")

    def _recover(self) -> None:
        """With no writer alive: leftover in_progress files failed, stray cache files removed."""
        with self._write_lock, open(self.directory / "write.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process is writing: its in_progress files are live
            with self._transaction() as conn:
                conn.execute("UPDATE files SET status = ?, error = ? WHERE status = ?",
                             (FileStatus.FAILED.value, INTERRUPTED, FileStatus.IN_PROGRESS.value))
            indexes.remove_stale(self.directory, self._generation())


_FILE_COLUMNS = "file_id, filename, status, error, attributes, num_chunks, created_at, chunking"


def _record(row: tuple) -> FileRecord:
    return FileRecord(row[0], row[1], FileStatus(row[2]), row[3], json.loads(row[4]), row[5], row[6],
                      ChunkingStrategy.from_request(json.loads(row[7])))


def _parse_mode(mode: SearchMode | str) -> SearchMode:
    try:
        return SearchMode(mode)
    except ValueError:
        raise InvalidRequestError(f"mode must be one of bm25, dense, hybrid, got {mode!r}", param="mode") from None


def _bm25_top(snapshot: indexes.IndexSnapshot, query: str, k: int,
              allowed: np.ndarray | None) -> list[tuple[int, float]]:
    """The k best chunks by BM25 with a positive score (sharing no term with the query is no match)."""
    scores = snapshot.bm25.scores(query)
    if allowed is not None:
        scores = np.where(np.isin(snapshot.bm25_keys, allowed), scores, 0.0)
    candidates = np.flatnonzero(scores > 0)
    top = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
    return list(zip(snapshot.bm25_keys[top].tolist(), scores[top].astype(float).tolist()))
