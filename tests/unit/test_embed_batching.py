"""Length buckets of the embedder and the server's embedding worker that merges concurrent requests."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from freehold.embed import Embedder
from freehold.embed.batching import plan_buckets
from freehold.errors import InvalidRequestError
from freehold.server.embedding_worker import EmbeddingWorker


def test_buckets_cover_every_input_once_within_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
        budget = rng.choice([1, 64, 512, 4096])
        buckets = plan_buckets(lengths, budget)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        for b in buckets:
            assert sum(lengths[i] for i in b) <= budget or len(b) == 1
            assert lengths[b[0]] == max(lengths[i] for i in b)
        firsts = [lengths[b[0]] for b in buckets]
        assert firsts == sorted(firsts, reverse=True)  # longest first: similar lengths share a bucket


def test_one_bucket_when_everything_fits():
    assert plan_buckets([3, 9, 5], 17) == [[1, 2, 0]]
    assert plan_buckets([3, 9, 5], 16) == [[1, 2], [0]]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


class _Gate:
    """Wraps embed_encoded: records each call's size, and holds the first call until released."""

    def __init__(self, embedder: Embedder):
        self.inner = embedder.embed_encoded
        self.sizes: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, encoded):
        self.sizes.append(len(encoded))
        self.started.set()
        self.release.wait(10)
        return self.inner(encoded)


def test_requests_arriving_during_a_call_are_merged_into_the_next(embedder, monkeypatch):
    gate = _Gate(embedder)
    monkeypatch.setattr(embedder, "embed_encoded", gate)
    worker = EmbeddingWorker(embedder)
    texts = [f"text number {i}" for i in range(6)]

    async def scenario():
        first = asyncio.ensure_future(worker.embed(["the first request"]))
        await asyncio.get_running_loop().run_in_executor(None, gate.started.wait, 10)
        rest = [asyncio.ensure_future(worker.embed([t, t + "!"])) for t in texts]
        bad = asyncio.ensure_future(worker.embed(["ok", ""]))
        await asyncio.sleep(0.2)  # all queued behind the held call
        gate.release.set()
        return await first, await asyncio.gather(*rest), await asyncio.gather(bad, return_exceptions=True)

    try:
        first, rest, [bad] = asyncio.run(scenario())
    finally:
        worker.close()
    assert gate.sizes == [1, 12]  # one call for the six requests that waited; the bad one failed alone
    assert isinstance(bad, InvalidRequestError) and bad.param == "input"
    for t, result in zip(texts, rest):
        assert np.abs(result.vectors - embedder.embed([t, t + "!"]).vectors).max() < 1e-6
    assert first.vectors.shape == (1, 384)


def test_the_token_budget_splits_merged_requests(embedder, monkeypatch):
    gate = _Gate(embedder)
    gate.release.set()
    monkeypatch.setattr(embedder, "embed_encoded", gate)
    monkeypatch.setattr(embedder, "max_batch_tokens", 10)  # each request below is 7 tokens
    worker = EmbeddingWorker(embedder)

    async def scenario():
        return await asyncio.gather(*(worker.embed([f"a b c d {i}"]) for i in range(4)))

    try:
        results = asyncio.run(scenario())
    finally:
        worker.close()
    assert all(r.num_tokens == [7] for r in results)
    assert max(gate.sizes) == 1 and sum(gate.sizes) == 4


def test_the_worker_releases_its_openmp_threads_when_it_goes_idle(embedder, monkeypatch):
    """An idle worker's OpenMP pool would make libgomp sleep the engine thread's workers (kernels/native.py)."""
    from freehold.server import embedding_worker as module
    calls: list[str] = []
    monkeypatch.setattr(module.native, "release_openmp_threads",
                        lambda: calls.append(threading.current_thread().name))
    worker = EmbeddingWorker(embedder)
    try:
        asyncio.run(worker.embed(["one request"]))
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.close()
    assert calls == ["freehold-embed"]  # on the worker's thread, once, after its only call
