"""The vector store the look-up tasks search: every pydoc topic (`pydoc_data.topics`, the Python reference text that
ships with Python) as one file, chunked small (256 tokens, 64 overlap) so that a search result fits a small model's
prompt. Built once per evaluation, in a folder the caller owns (a temp dir)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from freehold.agent.evaluation.tasks import Resources

MAX_CHUNK_TOKENS, CHUNK_OVERLAP_TOKENS = 256, 64


@dataclass(frozen=True)
class StoreBuild:
    num_files: int
    num_chunks: int
    seconds: float


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return dict(topics)


def build_pydoc_store(directory: str | Path, embedder: Any,
                      progress: Callable[[int, int], None] | None = None) -> tuple[Resources, StoreBuild]:
    """A StoreManager under `directory` holding one store of every pydoc topic (file `<topic>.txt`)."""
    from freehold.retrieval import ChunkingStrategy, FileInput, FileStatus, StoreManager
    started = time.perf_counter()
    manager = StoreManager(directory, embedder)
    info = manager.create("pydoc topics")
    strategy = ChunkingStrategy(MAX_CHUNK_TOKENS, CHUNK_OVERLAP_TOKENS)
    files = [FileInput(f"file-pydoc-{i:03d}", f"{name}.txt", text, {}, strategy)
             for i, (name, text) in enumerate(sorted(pydoc_topics().items()))]
    records = manager.open(info.id).add_files(files, progress)
    failed = [r for r in records if r.status is not FileStatus.COMPLETED]
    if failed:
        raise RuntimeError(f"{len(failed)} pydoc topics could not be indexed, e.g. {failed[0].filename}: "
                           f"{failed[0].error}")
    build = StoreBuild(len(records), sum(r.num_chunks for r in records), time.perf_counter() - started)
    return Resources(manager, (info.id,)), build
