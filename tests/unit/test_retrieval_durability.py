"""A vector store survives kill -9 in the middle of an ingest: reopened, it serves exactly the committed files.

A child process builds a store with two files, then starts a third ingest and stops at a chosen point (mid
embedding, i.e. before the commit; or after the commit while the index caches are being written), prints a marker
and sleeps; the test SIGKILLs it there and reopens the store in this process."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from freehold.embed import Embedder
from freehold.retrieval.records import FileStatus
from freehold.retrieval.store import INTERRUPTED, VectorStore

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from freehold.embed import Embedder
    from freehold.retrieval import indexes
    from freehold.retrieval.records import FileInput
    from freehold.retrieval.store import VectorStore

    directory, stop_at = Path(sys.argv[1]), sys.argv[2]
    store = VectorStore(directory, Embedder(), create=True)
    store.add_file(FileInput("cats", "cats.txt", "Cats are small mammals that purr.", {"n": 1}))
    store.add_file(FileInput("cars", "cars.txt", "Cars are motor vehicles with wheels.", {"n": 2}))

    def stop(*args):
        print("STOPPED", flush=True)
        time.sleep(60)

    if stop_at == "caches":  # after the commit: a half-written cache under a temporary name, then killed
        def half_saved(directory, generation, index, keys):
            (directory / ".tmp-partial").mkdir()
            (directory / ".tmp-partial" / "keys.npy").write_bytes(b"garbage")
            stop()
        indexes.save_bm25 = half_saved
    text = "Quarks and gluons are bound by the strong force. " * 60
    store.add_files([FileInput("qcd", "qcd.txt", text, {"n": 3})], progress=stop if stop_at == "embedding" else None)
""")


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def run_child_and_kill(directory: Path, stop_at: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), stop_at], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.strip() == "STOPPED", child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL


def test_kill_during_embedding_leaves_the_store_as_before_that_file(tmp_path, embedder):
    run_child_and_kill(tmp_path / "store", "embedding")
    store = VectorStore(tmp_path / "store", embedder)
    qcd = store.get_file("qcd")
    assert qcd.status is FileStatus.FAILED and qcd.error == INTERRUPTED and qcd.num_chunks == 0
    assert store.file_counts().completed == 2 and store.file_counts().in_progress == 0
    for mode in ("bm25", "dense", "hybrid"):
        result = store.search("quarks gluons strong force", mode)
        assert "qcd" not in {h.file_id for h in result.hits} and not result.incomplete
        assert store.search("mammals that purr", mode).hits[0].file_id == "cats"
    assert store.search("motor vehicles", "bm25", filters={"type": "eq", "key": "n", "value": 2}).hits[0].file_id \
        == "cars"


def test_kill_while_writing_caches_after_the_commit_keeps_the_file(tmp_path, embedder):
    run_child_and_kill(tmp_path / "store", "caches")
    store = VectorStore(tmp_path / "store", embedder)
    assert store.get_file("qcd").status is FileStatus.COMPLETED
    assert not (tmp_path / "store" / ".tmp-partial").exists()  # the half-written cache was removed on open
    for mode in ("bm25", "dense", "hybrid"):
        assert store.search("quarks gluons strong force", mode).hits[0].file_id == "qcd"
        assert store.search("mammals that purr", mode).hits[0].file_id == "cats"
