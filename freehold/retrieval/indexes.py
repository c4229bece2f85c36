"""The in-memory search indexes of one vector store, and their cache files on disk.

SQLite holds the truth (chunk texts and vectors, committed per file). The indexes are derived from it and tagged
with the store's generation, a counter bumped in the same SQLite transaction as every change: `bm25-<gen>/` (bm25s's
files plus the chunk ids in index order) and, once the store is past the exact-search threshold,
`dense-<gen>.usearch`. Cache files are written under a temporary name and renamed into place, so a cache either
exists whole or not at all; a cache whose generation is not the committed one is ignored and removed, and a
missing cache is rebuilt from SQLite.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freehold.retrieval.bm25 import BM25Index
from freehold.retrieval.dense import DenseIndex


@dataclass(frozen=True)
class IndexSnapshot:
    """What a search reads; replaced as a whole after each commit (readers keep the one they started with)."""
    generation: int
    bm25: BM25Index
    bm25_keys: np.ndarray  # int64 [num chunks]: chunk id of each BM25 position
    dense: DenseIndex


def bm25_path(directory: Path, generation: int) -> Path:
    return directory / f"bm25-{generation}"


def dense_path(directory: Path, generation: int) -> Path:
    return directory / f"dense-{generation}.usearch"


def build_bm25(keys: np.ndarray, texts: list[str]) -> tuple[BM25Index, np.ndarray]:
    return BM25Index.build(texts), np.asarray(keys, np.int64)


def save_bm25(directory: Path, generation: int, index: BM25Index, keys: np.ndarray) -> None:
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    index.save(tmp)
    np.save(tmp / "keys.npy", keys)
    os.replace(tmp, bm25_path(directory, generation))  # atomic: the directory appears whole


def load_bm25(directory: Path, generation: int) -> tuple[BM25Index, np.ndarray] | None:
    path = bm25_path(directory, generation)
    if not (path / "keys.npy").is_file():
        return None
    keys = np.load(path / "keys.npy")
    return BM25Index.load(path, len(keys)), keys


def save_dense(directory: Path, generation: int, index: DenseIndex) -> None:
    tmp = directory / f".tmp-{uuid.uuid4().hex}.usearch"
    if index.save_ann(tmp):
        os.replace(tmp, dense_path(directory, generation))


def load_dense(directory: Path, generation: int, dim: int) -> DenseIndex | None:
    path = dense_path(directory, generation)
    return DenseIndex.from_ann_file(path, dim) if path.is_file() else None


def remove_stale(directory: Path, generation: int) -> None:
    """Cache files of other generations and temporaries left by a crash (the caller holds the write lock)."""
    keep = {bm25_path(directory, generation).name, dense_path(directory, generation).name}
    for path in directory.iterdir():
        if path.name.startswith((".tmp-", "bm25-", "dense-")) and path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
