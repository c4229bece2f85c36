"""Dense retrieval over L2-normalized embeddings, scored by inner product (= cosine similarity).

Below `EXACT_THRESHOLD` vectors the search is exact: one matrix-vector product over every stored vector (20,000 x
384 floats is 30 MB, read in about 2.5 ms on one core here, about what the HNSW graph costs at 1M). Above it, an
HNSW graph from `usearch` answers approximately; `freehold bench vectors` measures its recall@10 against the exact
answer at 1,000,000 vectors. usearch reports the inner-product *distance* 1 - <q, v>; scores here are <q, v>.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from usearch.index import Index

EXACT_THRESHOLD = 20_000
CONNECTIVITY = 16  # HNSW edges per node (usearch's default)
EXPANSION_ADD = 128  # candidate list while inserting (usearch's default)
EXPANSION_SEARCH = 128  # candidate list while searching: recall@10 >= 0.95 at 1M in `freehold bench vectors`


@dataclass(frozen=True)
class DenseHits:
    keys: np.ndarray  # int64 [n], best first
    scores: np.ndarray  # float32 [n]: inner products


def new_ann_index(dim: int) -> Index:
    return Index(ndim=dim, metric="ip", dtype="f32", connectivity=CONNECTIVITY,
                 expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)


def exact_search(vectors: np.ndarray, keys: np.ndarray, query: np.ndarray, k: int,
                 allowed: np.ndarray | None = None) -> DenseHits:
    """Top k of vectors @ query (only rows whose key is in `allowed`, when given)."""
    scores = vectors @ query
    if allowed is not None:
        scores = np.where(np.isin(keys, allowed), scores, -np.inf)
    k = min(k, int(np.isfinite(scores).sum()))
    top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(k)
    top = top[np.argsort(-scores[top], kind="stable")]
    return DenseHits(keys[top], scores[top].astype(np.float32))


class DenseIndex:
    """Vectors under int64 keys. Exact up to `threshold` vectors, usearch's HNSW above (built once it is crossed).
    `add`/`remove` may run while other threads search: the exact arrays are swapped as one tuple, and the usearch
    index is guarded by a lock."""

    def __init__(self, dim: int, threshold: int = EXACT_THRESHOLD):
        self.dim = dim
        self.threshold = threshold
        self._exact: tuple[np.ndarray, np.ndarray] | None = (np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
        self._ann: Index | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._exact[0]) if self._exact is not None else len(self._ann)

    @property
    def is_exact(self) -> bool:
        return self._exact is not None

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys, vectors = np.asarray(keys, np.int64), np.ascontiguousarray(vectors, np.float32)
        if self._exact is not None and len(self._exact[0]) + len(keys) <= self.threshold:
            old_keys, old_vectors = self._exact
            self._exact = (np.concatenate([old_keys, keys]), np.concatenate([old_vectors, vectors]))
            return
        with self._lock:
            if self._ann is None:
                self._ann = new_ann_index(self.dim)
                old_keys, old_vectors = self._exact
                if len(old_keys):
                    self._ann.add(old_keys, old_vectors)
            if len(keys):
                self._ann.add(keys, vectors)
            self._exact = None

    def remove(self, keys: np.ndarray) -> None:
        if self._exact is not None:
            old_keys, old_vectors = self._exact
            keep = ~np.isin(old_keys, keys)
            self._exact = (old_keys[keep], old_vectors[keep])
            return
        with self._lock:
            self._ann.remove(np.asarray(keys, np.int64))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> DenseHits:
        exact = self._exact
        if exact is not None:
            return exact_search(exact[1], exact[0], np.asarray(query, np.float32), k, allowed)
        return self._ann_search(np.asarray(query, np.float32), k, allowed)

    def _ann_search(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> DenseHits:
        """With a filter: ask for 4x more, then 4x again, until k allowed hits or the whole index was returned."""
        fetch = k if allowed is None else 4 * k
        while True:
            with self._lock:
                total = len(self._ann)
                matches = self._ann.search(query, min(fetch, total)) if total else None
            if matches is None:
                return DenseHits(np.zeros(0, np.int64), np.zeros(0, np.float32))
            keys, scores = matches.keys.astype(np.int64), (1.0 - matches.distances).astype(np.float32)
            if allowed is not None:
                mask = np.isin(keys, allowed)
                keys, scores = keys[mask], scores[mask]
            if len(keys) >= k or fetch >= total:
                return DenseHits(keys[:k], scores[:k])
            fetch *= 4

    def save_ann(self, path: Path) -> bool:
        """Writes the HNSW graph (only when the index has one); returns whether it wrote."""
        with self._lock:
            if self._ann is None:
                return False
            self._ann.save(str(path))
            return True

    @classmethod
    def from_ann_file(cls, path: Path, dim: int, threshold: int = EXACT_THRESHOLD) -> DenseIndex:
        index = cls(dim, threshold)
        ann = new_ann_index(dim)
        ann.load(str(path))
        index._ann, index._exact = ann, None
        return index
