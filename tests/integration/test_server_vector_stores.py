"""Files and vector stores through the official `openai` client (issue 16): upload, attach (in_progress ->
completed), search in each ranking mode with filters, the bad inputs, and durability: a restart keeps every store,
and a server killed (SIGKILL) in the middle of an ingest restarts with a consistent store.

One server per test module on a temporary data directory (the default model and embedder).
"""
from __future__ import annotations

import os
import signal
import tempfile
import time
from typing import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import ServerProcess, start_server, stop_server

DOCS = {
    "volcanoes.txt": "Volcanoes erupt when magma rises through the crust. Lava flows and ash clouds follow.",
    "baking.txt": "Bread is baked from flour, water, salt and yeast. The dough rises before it goes in the oven.",
    "chess.txt": "In chess, castling moves the king two squares towards a rook. A pawn promotes on the last rank.",
}
ARGS = ("--kv-cache-memory", "64M", "--max-model-len", "1024")


@pytest.fixture(scope="module")
def data_dir() -> str:
    return tempfile.mkdtemp(prefix="freehold-vs-")


@pytest.fixture(scope="module")
def vs_server(data_dir: str) -> Iterator[ServerProcess]:
    s = start_server(*ARGS, "--data-dir", data_dir)
    yield s
    stop_server(s)


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def store(vs_server: ServerProcess) -> dict:
    """A store with the three documents, each with a `topic` attribute, all completed."""
    client = _client(vs_server)
    vs = client.vector_stores.create(name="kb", metadata={"team": "a"})
    ids = {}
    for name, text in DOCS.items():
        upload = client.files.create(file=(name, text.encode()), purpose="assistants")
        attached = client.vector_stores.files.create_and_poll(
            vector_store_id=vs.id, file_id=upload.id, attributes={"topic": name.split(".")[0], "rank": len(ids)},
            poll_interval_ms=100)
        assert attached.status == "completed", attached.last_error
        ids[name] = upload.id
    return {"id": vs.id, "files": ids}


def test_upload_attach_and_search(vs_server: ServerProcess, store: dict) -> None:
    client = _client(vs_server)
    vs = client.vector_stores.retrieve(store["id"])
    assert vs.name == "kb" and vs.status == "completed" and vs.metadata == {"team": "a"}
    assert vs.file_counts.completed == 3 and vs.file_counts.total == 3 and vs.usage_bytes > 0
    assert {f.id for f in client.vector_stores.files.list(store["id"])} == set(store["files"].values())
    for ranker in ("auto", "bm25", "dense", "hybrid"):
        page = client.vector_stores.search(store["id"], query="how does lava come out of a mountain?",
                                           ranking_options={"ranker": ranker}, max_num_results=2)
        assert page.data[0].filename == "volcanoes.txt", (ranker, page.data)
        assert "magma" in page.data[0].content[0].text
        assert page.data[0].attributes == {"topic": "volcanoes", "rank": 0}  # an integer stays an integer
        assert len(page.data) <= 2 and page.data[0].score >= page.data[-1].score


def test_filters_and_score_threshold(vs_server: ServerProcess, store: dict) -> None:
    client = _client(vs_server)
    page = client.vector_stores.search(store["id"], query="how does lava come out of a mountain?",
                                       filters={"type": "eq", "key": "topic", "value": "chess"})
    assert [hit.filename for hit in page.data] == ["chess.txt"]
    either = {"type": "or", "filters": [{"type": "eq", "key": "topic", "value": "chess"},
                                        {"type": "eq", "key": "topic", "value": "baking"}]}
    page = client.vector_stores.search(store["id"], query="bread dough", filters=either)
    assert [hit.filename for hit in page.data][0] == "baking.txt" and len(page.data) == 2
    none = client.vector_stores.search(store["id"], query="bread dough", ranking_options={"score_threshold": 1.01})
    assert none.data == []


@pytest.mark.parametrize("path, body, status, param", [
    ("/vector_stores/vs_00000000000000000000000000000000/search", {"query": "x"}, 404, "vector_store_id"),
    ("/vector_stores/nope", None, 404, "vector_store_id"),
    ("/files/file-nope", None, 404, "file_id"),
])
def test_unknown_ids_are_404s(vs_server: ServerProcess, path: str, body: dict | None, status: int,
                              param: str) -> None:
    url = f"{vs_server.base_url}{path}"
    r = httpx.post(url, json=body, timeout=30) if body is not None else httpx.get(url, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_bad_uploads_and_searches_are_400s(vs_server: ServerProcess, store: dict) -> None:
    client = _client(vs_server)
    binary = client.files.create(file=("blob.bin", b"\x00\x01\x02 binary"), purpose="assistants")
    latin1 = client.files.create(file=("latin1.txt", "caf\u00e9".encode("latin-1")), purpose="assistants")
    for upload, words in ((binary, "not a text file"), (latin1, "not UTF-8")):
        with pytest.raises(openai.BadRequestError, match=words):
            client.vector_stores.files.create(vector_store_id=store["id"], file_id=upload.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.search(store["id"], query="x", filters={"type": "eq", "key": "colour", "value": "red"})
    assert "colour" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(store["id"], query="x", ranking_options={"ranker": "magic"})
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(store["id"], query="x", max_num_results=51)
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("empty.txt", b""), purpose="assistants")
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.files.create(vector_store_id=store["id"], file_id=store["files"]["chess.txt"])
    assert client.vector_stores.retrieve(store["id"]).file_counts.completed == 3  # nothing changed


def test_delete_file_and_store(vs_server: ServerProcess) -> None:
    client = _client(vs_server)
    vs = client.vector_stores.create(name="temporary")
    upload = client.files.create(file=("chess.txt", DOCS["chess.txt"].encode()), purpose="assistants")
    client.vector_stores.files.create_and_poll(vector_store_id=vs.id, file_id=upload.id, poll_interval_ms=100)
    assert client.vector_stores.files.delete(file_id=upload.id, vector_store_id=vs.id).deleted
    assert client.vector_stores.search(vs.id, query="castling").data == []
    assert client.vector_stores.delete(vs.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(vs.id)
    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)


def test_stores_survive_a_restart_and_a_kill_during_ingest(vs_server: ServerProcess, store: dict,
                                                            data_dir: str) -> None:
    """Two restarts on the module's data directory (one server start fewer than a separate directory for the kill):
    after a clean stop every store answers as before; after a SIGKILL mid-ingest the killed store is consistent and
    the stores it did not touch still answer as before."""
    query = {"query": "castling the king", "max_num_results": 3}
    before = httpx.post(f"{vs_server.base_url}/vector_stores/{store['id']}/search", json=query, timeout=60).json()
    stop_server(vs_server)  # the module's server, restarted on the same data directory
    other = start_server(*ARGS, "--data-dir", data_dir)
    try:
        after = httpx.post(f"{other.base_url}/vector_stores/{store['id']}/search", json=query, timeout=60).json()
        assert after["data"] == before["data"]
        client = _client(other)
        vs = client.vector_stores.create(name="killed")
        done = client.files.create(file=("chess.txt", DOCS["chess.txt"].encode()), purpose="assistants")
        client.vector_stores.files.create_and_poll(vector_store_id=vs.id, file_id=done.id, poll_interval_ms=100)
        big = " ".join(f"Sentence {i} is about topic {i % 97} and nothing else." for i in range(20_000))
        upload = client.files.create(file=("big.txt", big.encode()), purpose="assistants")
        attached = client.vector_stores.files.create(vector_store_id=vs.id, file_id=upload.id)
        assert attached.status == "in_progress"
        queued = client.files.create(file=("baking.txt", DOCS["baking.txt"].encode()), purpose="assistants")
        assert client.vector_stores.files.create(vector_store_id=vs.id, file_id=queued.id).status == "in_progress"
        during = httpx.post(f"{other.base_url}/vector_stores/{vs.id}/search", json={"query": "topic 5"}, timeout=60)
        assert during.headers["X-Freehold-Search-Incomplete"] == "true"  # answered from the completed file only
        assert {hit["file_id"] for hit in during.json()["data"]} <= {done.id}
        time.sleep(0.5)  # the ingest thread is chunking and embedding
        os.kill(other.process.pid, signal.SIGKILL)
        other.process.wait(timeout=30)
    finally:
        stop_server(other)
    restarted = start_server(*ARGS, "--data-dir", data_dir)
    try:
        client = _client(restarted)
        resumed = client.vector_stores.files.poll(queued.id, vector_store_id=vs.id, poll_interval_ms=100)
        assert resumed.status == "completed"  # queued when the server died: ingested after the restart
        files = {f.id: f.status for f in client.vector_stores.files.list(vs.id)}
        assert files[done.id] == "completed"
        # killed mid-ingest: marked failed on restart (completed only if the ingest beat the kill)
        assert files[upload.id] in ("failed", "completed")
        assert client.vector_stores.retrieve(vs.id).file_counts.in_progress == 0
        hits = {h.file_id for h in client.vector_stores.search(vs.id, query="Sentence 12 topic 5").data}
        completed = {f for f, status in files.items() if status == "completed"}
        assert hits <= completed  # nothing of a half-ingested file is served
        after = httpx.post(f"{restarted.base_url}/vector_stores/{store['id']}/search", json=query, timeout=60).json()
        assert after["data"] == before["data"]  # the store the kill did not touch
    finally:
        stop_server(restarted)
