"""`UploadStore`: files uploaded for vector stores (OpenAI's /v1/files), durable under `DATA_DIR/files/`.

Each upload is one blob file plus one SQLite row. The blob is written under a temporary name, flushed and renamed,
and only then is the row inserted: a crash at any point leaves either no row (and at most a stray temporary blob,
removed on the next open) or a complete upload. Deleting removes the row first, then the blob.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from freehold.errors import InvalidRequestError
from freehold.retrieval.records import StoreNotFoundError
from freehold.sqlite_wal import connect_wal

_SCHEMA = """CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, purpose TEXT NOT NULL,
    created_at INTEGER NOT NULL)"""
PURPOSES = ("assistants", "user_data")  # the purposes a retrieval upload may have


@dataclass(frozen=True)
class Upload:
    id: str  # file-<hex>
    filename: str
    bytes: int
    purpose: str
    created_at: int


class UploadStore:
    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir) / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stray in self.dir.glob("*.tmp"):  # an upload interrupted before its row was written
            stray.unlink(missing_ok=True)
        self._conn = connect_wal(self.dir / "uploads.sqlite")
        self._conn.execute(_SCHEMA)
        self._lock = threading.Lock()

    def add(self, filename: str, content: bytes, purpose: str) -> Upload:
        if purpose not in PURPOSES:
            raise InvalidRequestError(f"purpose must be one of {', '.join(PURPOSES)} (files for vector stores), got "
                                      f"{purpose!r}", param="purpose")
        if not content:
            raise InvalidRequestError("the file is empty", param="file")
        upload = Upload(f"file-{uuid.uuid4().hex}", filename or "upload", len(content), purpose, int(time.time()))
        tmp = self.dir / f"{upload.id}.tmp"
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / upload.id)
        with self._lock:
            self._conn.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, ?)",
                               (upload.id, upload.filename, upload.bytes, upload.purpose, upload.created_at))
        return upload

    def list(self) -> list[Upload]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM uploads ORDER BY created_at DESC, id").fetchall()
        return [Upload(*row) for row in rows]

    def get(self, file_id: str) -> Upload:
        with self._lock:
            row = self._conn.execute("SELECT * FROM uploads WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise StoreNotFoundError(f"no file with id {file_id!r}", param="file_id")
        return Upload(*row)

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        return (self.dir / file_id).read_bytes()

    def text(self, file_id: str) -> str:
        """The upload as text: UTF-8 (a BOM is dropped) with no NUL bytes; else InvalidRequestError naming
        file_id, since only text files can be chunked."""
        data = self.content(file_id)
        if b"\x00" in data:
            raise InvalidRequestError(f"file {file_id} is not a text file (it holds NUL bytes): upload plain text "
                                      "such as .txt or .md", param="file_id")
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"file {file_id} is not UTF-8 text (byte {exc.start} is invalid)",
                                      param="file_id") from None

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        with self._lock:
            self._conn.execute("DELETE FROM uploads WHERE id = ?", (file_id,))
        (self.dir / file_id).unlink(missing_ok=True)

    def close(self) -> None:
        self._conn.close()
