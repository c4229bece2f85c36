"""`StoreManager`: the vector stores under one data directory (`DATA_DIR/vs_<hex>/`, each a `VectorStore`).

The surface an HTTP layer for OpenAI's /v1/vector_stores sits on: create / list / get / delete stores, add /
list / get / delete files, search. One `VectorStore` object per store per process, so its write lock is shared.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from freehold.retrieval.chunking import ChunkingStrategy
from freehold.retrieval.filters import AttributeValue, Filter
from freehold.retrieval.records import FileInput, FileRecord, SearchMode, SearchResult, StoreInfo, StoreNotFoundError
from freehold.retrieval.store import Embedding, VectorStore

_STORE_ID = re.compile(r"^vs_[0-9a-f]{32}$")


class StoreManager:
    def __init__(self, data_dir: str | Path, embedder: Embedding):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self._open: dict[str, VectorStore] = {}
        self._lock = threading.Lock()

    def create(self, name: str | None = None, metadata: dict[str, Any] | None = None) -> StoreInfo:
        store_id = f"vs_{uuid.uuid4().hex}"
        with self._lock:
            self._open[store_id] = VectorStore(self.data_dir / store_id, self.embedder, create=True, name=name,
                                               metadata=metadata)
        return self.get(store_id)

    def list(self) -> list[StoreInfo]:
        ids = [p.name for p in self.data_dir.iterdir() if _STORE_ID.match(p.name)]
        return sorted(filter(None, map(self._get_or_none, ids)), key=lambda info: -info.created_at)

    def _get_or_none(self, store_id: str) -> StoreInfo | None:
        """None for a store deleted meanwhile (or a directory left with no store.sqlite), so one does not 404
        the whole listing."""
        try:
            return self.get(store_id)
        except StoreNotFoundError:
            return None

    def get(self, store_id: str) -> StoreInfo:
        store = self.open(store_id)
        meta = store.meta()
        return StoreInfo(store_id, meta["name"], meta["created_at"], store.file_counts(), store.usage_bytes(),
                         meta["embedder"], meta["metadata"])

    def open(self, store_id: str) -> VectorStore:
        if not isinstance(store_id, str) or not _STORE_ID.match(store_id):
            raise StoreNotFoundError(f"no vector store with id {store_id!r}", param="vector_store_id")
        with self._lock:
            if store_id not in self._open:
                if not (self.data_dir / store_id / "store.sqlite").is_file():
                    raise StoreNotFoundError(f"no vector store with id {store_id!r}", param="vector_store_id")
                self._open[store_id] = VectorStore(self.data_dir / store_id, self.embedder)
            return self._open[store_id]

    def delete(self, store_id: str) -> None:
        """Renamed away first (atomic: the store is gone at once even if the removal below is interrupted)."""
        store = self.open(store_id)
        with self._lock:
            self._open.pop(store_id, None)
        store.close()
        trash = self.data_dir / f".deleted-{store_id}-{uuid.uuid4().hex[:8]}"
        os.replace(self.data_dir / store_id, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def add_file(self, store_id: str, file_id: str, filename: str, text: str,
                 attributes: dict[str, AttributeValue] | None = None,
                 chunking: ChunkingStrategy | dict | None = None) -> FileRecord:
        if not isinstance(chunking, ChunkingStrategy):
            chunking = ChunkingStrategy.from_request(chunking)
        file = FileInput(file_id, filename, text, attributes or {}, chunking)
        return self.open(store_id).add_file(file)

    def list_files(self, store_id: str) -> list[FileRecord]:
        return self.open(store_id).list_files()

    def get_file(self, store_id: str, file_id: str) -> FileRecord:
        return self.open(store_id).get_file(file_id)

    def delete_file(self, store_id: str, file_id: str) -> None:
        self.open(store_id).delete_file(file_id)

    def search(self, store_id: str, query: str, mode: SearchMode | str = SearchMode.HYBRID,
               max_num_results: int = 10, filters: Filter | dict | None = None,
               score_threshold: float = 0.0) -> SearchResult:
        return self.open(store_id).search(query, mode, max_num_results, filters, score_threshold)
