"""The embedder on one thread of its own, batching concurrent requests: requests that arrive while a call runs are
merged into the next call (up to `max_batch_tokens` of their tokens), so the endpoint neither serializes requests
nor blocks the event loop or the engine thread.

    event loop:  EmbeddingWorker.embed(inputs) -> queue -> await the job's future
    worker:      take a job, then every job already queued -> tokenize each (a bad one fails alone)
                 -> one Embedder.embed_encoded over the jobs that fit the token budget -> each job's rows back

A row's vector does not depend on the rows it is merged with (`freehold.embed.batching`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from freehold.embed import EmbedResult, Embedder
from freehold.embed.tokens import Encoded
from freehold.errors import FreeholdError
from freehold.kernels import native

log = logging.getLogger("freehold.server")


@dataclass
class _Job:
    inputs: Sequence[str] | Sequence[Sequence[int]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    encoded: list[Encoded] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.ids) for e in self.encoded)


class EmbeddingWorker:
    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.model_names = (embedder.name, *embedder.aliases)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="freehold-embed", daemon=True)
        self._thread.start()

    async def embed(self, inputs: Sequence[str] | Sequence[Sequence[int]]) -> EmbedResult:
        """The inputs' vectors, computed on the worker thread (InvalidRequestError for bad inputs)."""
        job = _Job(inputs)
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def close(self) -> None:
        """Finish the jobs queued so far, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- the worker thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        ready: deque[_Job] = deque()  # tokenized, waiting for a call
        stopping = False
        while not (stopping and not ready):
            if not ready:
                stopping = self._admit(self._queue.get(), ready)
            while not stopping:  # everything that arrived meanwhile joins the next call
                try:
                    stopping = self._admit(self._queue.get_nowait(), ready)
                except queue.Empty:
                    break
            if ready:
                self._run(self._take_batch(ready))
                if not ready and self._queue.empty():  # idle: its OpenMP workers would slow the engine's (native.py)
                    native.release_openmp_threads()

    def _admit(self, job: _Job | None, ready: deque[_Job]) -> bool:
        """Tokenize a job into `ready` (or fail it alone); True when the stop marker came."""
        if job is None:
            return True
        if not job.future.set_running_or_notify_cancel():  # the client went away while it waited
            return False
        try:
            job.encoded = self.embedder.tokenize(job.inputs)
        except FreeholdError as exc:
            job.future.set_exception(exc)
            return False
        ready.append(job)
        return False

    def _take_batch(self, ready: deque[_Job]) -> list[_Job]:
        """The oldest jobs whose tokens fit the budget together (always at least one)."""
        batch = [ready.popleft()]
        used = batch[0].num_tokens
        while ready and used + ready[0].num_tokens <= self.embedder.max_batch_tokens:
            used += ready[0].num_tokens
            batch.append(ready.popleft())
        return batch

    def _run(self, jobs: list[_Job]) -> None:
        try:
            result = self.embedder.embed_encoded([e for job in jobs for e in job.encoded])
        except Exception as exc:  # noqa: BLE001 - an embedder bug fails these requests, the thread serves on
            log.exception("embedding failed")
            for job in jobs:
                job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            end = start + len(job.encoded)
            job.future.set_result(EmbedResult(result.vectors[start:end], result.num_tokens[start:end],
                                              result.truncated[start:end]))
            start = end
