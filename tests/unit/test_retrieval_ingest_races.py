"""Deletes racing an ingest (issue 16): a store deleted while a file is being embedded stays deleted and does not
break the listing; a file detached while it waits for the ingest thread is never added; a file being ingested is
counted once. The real embedder, held mid-ingest by a gate so each race is hit deterministically."""
from __future__ import annotations

import threading
import time

import pytest

from freehold.embed import Embedder
from freehold.retrieval.chunking import ChunkingStrategy
from freehold.retrieval.manager import StoreManager
from freehold.retrieval.records import FileCounts, FileStatus
from freehold.server.ingest import Retrieval


class Gated:
    """The real embedder, whose embed() waits for `release` (and sets `entered`) while `armed`."""

    def __init__(self, embedder: Embedder):
        self.inner, self.name, self.dim = embedder, embedder.name, embedder.dim
        self.encode_tokens, self.decode_tokens = embedder.encode_tokens, embedder.decode_tokens
        self.entered, self.release, self.armed = threading.Event(), threading.Event(), True

    def embed(self, texts):
        if self.armed:
            self.entered.set()
            assert self.release.wait(60)
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def test_a_store_deleted_while_ingesting_stays_deleted_and_the_listing_works(tmp_path, embedder):
    gated = Gated(embedder)
    manager = StoreManager(tmp_path, gated)
    keep, doomed = manager.create("keep").id, manager.create("doomed").id
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            manager.add_file(doomed, "file-1", "a.txt", "Cats are small mammals that purr.")
        except Exception as exc:  # noqa: BLE001 - the store vanished under it: it may fail, it must not resurrect
            errors.append(exc)

    worker = threading.Thread(target=ingest)
    worker.start()
    assert gated.entered.wait(60)  # the file is being embedded
    manager.delete(doomed)
    gated.release.set()
    worker.join(60)
    assert not (tmp_path / doomed).exists()
    assert [info.id for info in manager.list()] == [keep]


def test_a_queued_file_detached_is_never_added_and_files_count_once(tmp_path, embedder):
    gated = Gated(embedder)
    retrieval = Retrieval(tmp_path, gated)
    try:
        store = retrieval.stores.create("s").id
        a, b, c = (retrieval.uploads.add(f"{n}.txt", t.encode(), "assistants").id
                   for n, t in (("a", "Cats are mammals."), ("b", "Bread needs yeast."), ("c", "Chess has rooks.")))
        retrieval.attach(store, a, None, ChunkingStrategy())
        retrieval.attach(store, b, None, ChunkingStrategy())
        assert gated.entered.wait(60)  # a is being embedded (in the store, in_progress); b waits in the queue
        assert retrieval.file_counts(store, retrieval.stores.get(store).file_counts) == FileCounts(in_progress=2)
        retrieval.detach(store, b)
        assert [r.file_id for r in retrieval.files(store)] == [a]
        gated.armed = False
        gated.release.set()
        retrieval.attach(store, c, None, ChunkingStrategy())  # queued after b's turn: once c is done, b's is over
        deadline = time.monotonic() + 60
        while retrieval.file(store, c).status is FileStatus.IN_PROGRESS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(r.file_id for r in retrieval.files(store)) == sorted([a, c])
        assert retrieval.file_counts(store, retrieval.stores.get(store).file_counts) == FileCounts(completed=2)
    finally:
        retrieval.close()


def test_the_ingest_thread_releases_its_openmp_threads_when_its_queue_empties(tmp_path, embedder, monkeypatch):
    """An idle ingest thread's OpenMP pool would make libgomp sleep the engine thread's workers (kernels/native.py)."""
    from freehold.server import ingest as module
    calls: list[str] = []
    monkeypatch.setattr(module.native, "release_openmp_threads",
                        lambda: calls.append(threading.current_thread().name))
    retrieval = Retrieval(tmp_path, embedder)
    try:
        store = retrieval.stores.create("s").id
        file = retrieval.uploads.add("a.txt", b"Cats are mammals.", "assistants").id
        retrieval.attach(store, file, None, ChunkingStrategy())
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert retrieval.file(store, file).status is FileStatus.COMPLETED
    finally:
        retrieval.close()
    assert calls == ["freehold-ingest"]
