"""Retrieval: chunking, BM25 + dense + hybrid (reciprocal rank fusion) search, and durable vector stores.

Needs the `retrieval` extra (bm25s, usearch): `pip install 'freehold[retrieval]'`.
"""
import importlib.util

_MISSING = [m for m in ("bm25s", "usearch") if importlib.util.find_spec(m) is None]
if _MISSING:
    raise ImportError(f"freehold.retrieval needs {', '.join(_MISSING)}, which is not installed: "
                      "pip install 'freehold[retrieval]'")

from freehold.retrieval.chunking import ChunkingStrategy  # noqa: E402  (after the check: these import bm25s/usearch)
from freehold.retrieval.manager import StoreManager  # noqa: E402
from freehold.retrieval.records import (FileInput, FileRecord, FileStatus, SearchHit, SearchMode,  # noqa: E402
                                        SearchResult, StoreInfo, StoreNotFoundError)
from freehold.retrieval.store import VectorStore  # noqa: E402

__all__ = ["ChunkingStrategy", "FileInput", "FileRecord", "FileStatus", "SearchHit", "SearchMode", "SearchResult",
           "StoreInfo", "StoreManager", "StoreNotFoundError", "VectorStore"]
