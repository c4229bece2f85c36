"""Slow work kept off the event loop, each kind on its own threads, so one kind never queues behind another:
grammar compiles (seconds for a large schema) on a small bounded pool with a timeout, tokenization and chat
templates on theirs. A plain request never waits for a thread a compile holds.

A compile that outlives its timeout cannot be stopped (a thread inside xgrammar's C++ cannot be interrupted): the
request gets its 400 at once, the compile finishes in the background on its worker, and its result is cached for
the next identical request. So at most `workers` compiles run and `queue` more wait; a request beyond that gets
503 at once. A request for a spec already being compiled waits for that compile instead of starting another.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Callable, TypeVar

from freehold.constrain.compiler import ConstraintCompiler
from freehold.constrain.spec import Constraint, ConstraintSpec
from freehold.server.errors import GrammarCompilerBusyError, GrammarCompileTimeoutError, ServerShuttingDownError

T = TypeVar("T")


class PoolFullError(RuntimeError):
    def __init__(self, num_in_flight: int):
        super().__init__(f"{num_in_flight} jobs running or queued")
        self.num_in_flight = num_in_flight


class BoundedExecutor:
    """A thread pool that holds at most `max_workers + max_queued` jobs (running or waiting); `submit` raises
    PoolFullError beyond that. A job leaves the count when it finishes, not when its caller stops waiting."""

    def __init__(self, max_workers: int, max_queued: int, name: str):
        self.capacity = max_workers + max_queued
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self.num_in_flight = 0

    def submit(self, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        with self._lock:
            if self.num_in_flight >= self.capacity:
                raise PoolFullError(self.num_in_flight)
            self.num_in_flight += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._release)
        return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _release(self, _: concurrent.futures.Future) -> None:
        with self._lock:
            self.num_in_flight -= 1


class GrammarCompiles:
    """`compile(spec, param)` on the event loop: the cached constraint, or one compiled on the bounded pool."""

    def __init__(self, compiler: ConstraintCompiler, workers: int, queue: int, timeout_s: float):
        self.compiler = compiler
        self.timeout_s = timeout_s
        self._pool = BoundedExecutor(workers, queue, "freehold-grammar")
        self._in_flight: dict[ConstraintSpec, concurrent.futures.Future[Constraint]] = {}
        self._closing = asyncio.Event()

    async def compile(self, spec: ConstraintSpec, param: str) -> Constraint:
        """Raises freehold's InvalidRequestError (the spec cannot be enforced), GrammarCompileTimeoutError,
        GrammarCompilerBusyError, or ServerShuttingDownError (the server began to stop while this waited)."""
        known = self.compiler.lookup(spec)
        if known is not None:
            return known
        if self._closing.is_set():
            raise ServerShuttingDownError()
        future = self._in_flight.get(spec) or self._start(spec, param)
        waiting = asyncio.ensure_future(asyncio.wrap_future(future))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            done, _ = await asyncio.wait({waiting, closing}, timeout=self.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if waiting in done and not waiting.cancelled():  # (close() cancels queued compiles)
            return waiting.result()
        waiting.add_done_callback(_ignore_outcome)  # the compile runs on (see the module docstring)
        if self._closing.is_set():
            raise ServerShuttingDownError()
        raise GrammarCompileTimeoutError(self.timeout_s, param)

    def close(self) -> None:
        """Stop waiting for compiles (waiters get ServerShuttingDownError) and drop queued ones."""
        self._closing.set()
        self._pool.shutdown()

    def _start(self, spec: ConstraintSpec, param: str) -> concurrent.futures.Future[Constraint]:
        try:
            future = self._pool.submit(self.compiler.compile, spec)
        except PoolFullError as exc:
            raise GrammarCompilerBusyError(exc.num_in_flight, param) from None
        self._in_flight[spec] = future
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda _: _call_soon(loop, self._in_flight.pop, spec, None))
        return future


def _ignore_outcome(future: asyncio.Future) -> None:
    """Retrieve a result nobody waits for any more (asyncio would log an unretrieved exception)."""
    if not future.cancelled():
        future.exception()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop has closed: the server is gone
        pass
