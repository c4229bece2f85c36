"""The engine on its own thread, with an asyncio streaming interface for the server.

The engine is touched only by its thread. Callers enqueue commands (add, abort, reset); the thread applies them
between steps and pushes each RequestOutput to the request's asyncio queue through the caller's event loop.

Failures, from the narrowest:
- a request that fails on its own input (RequestOutput.error): that request's stream raises the error;
- a step that raises (an engine bug): the requests in flight get EngineDeadError (no details of other requests),
  and the thread serves on;
- anything else that escapes on the engine thread (applying a command): the thread stops for good; every request
  in flight or queued, and every later one, gets EngineDeadError at once (none waits forever), /health says so.
`fail_all` (shutdown) ends the requests in flight with the caller's error and refuses later adds with it too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, NamedTuple

from freehold.engine.engine import Engine, EngineStats
from freehold.kernels import native
from freehold.types import RequestOutput, SamplingParams

log = logging.getLogger("freehold.engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed while running this request (a bug, not bad input)."""


STUCK_STEP_S = 120.0  # a step running longer than this makes the engine unhealthy (a long prefill takes seconds)


class EngineHealth(NamedTuple):
    ok: bool
    reason: str  # why not, for /health


@dataclass(frozen=True)
class _FailAll:
    error: Exception


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: Callable[[RequestOutput | Exception], None]


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Stop:
    request_id: str
    index: int


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def done(self, result: object = None, error: BaseException | None = None) -> None:
        if error is None:
            self.loop.call_soon_threadsafe(_settle, self.future, result, None)
        else:
            self.loop.call_soon_threadsafe(_settle, self.future, None, error)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Callable[[RequestOutput | Exception], None]] = {}
        self._stats = engine.stats()
        self._step_started: float | None = None  # monotonic time of the step in progress
        self._refusal: Exception | None = None  # set by fail_all: later adds end with it at once
        self._dead: EngineDeadError | None = None  # set when the engine thread stopped on an error
        self._dead_lock = threading.Lock()  # orders "enqueue unless dead" against "die and drain the queue"
        native.release_openmp_threads()  # this thread loaded the model: leave OpenMP's workers to the engine thread
        self._thread = threading.Thread(target=self._loop, name="freehold-engine", daemon=True)
        self._running = True
        self._thread.start()

    # -- public API (any thread / the event loop) ---------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise the engine's validation error now, before a stream starts (reads config only)."""
        self.engine.check_request(prompt_token_ids, params)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs step by step; aborts the request if the consumer stops early."""
        self.check_request(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        sink = lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item)  # noqa: E731
        self._enqueue(_Add(request_id, list(prompt_token_ids), params, sink))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stop_sequence(self, request_id: str, index: int) -> None:
        """End one completion with finish_reason "stop" (a stop string matched in the text layer)."""
        self._commands.put(_Stop(request_id, index))

    async def call(self, fn: Callable[[Engine], object]) -> object:
        """Run fn(engine) on the engine thread between steps (admin actions such as a cache reset)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._enqueue(_Call(fn, loop, future))
        return await future

    def fail_all(self, error: Exception) -> None:
        """End every request in flight with `error` (raised by its `generate`), and every request added later too:
        for shutdown. Thread-safe; applied by the engine thread before its next step."""
        self._commands.put(_FailAll(error))

    def health(self, stuck_after_s: float = STUCK_STEP_S) -> EngineHealth:
        """Whether the engine thread is alive and not stuck in one step for longer than `stuck_after_s`."""
        if self._dead is not None or not self._thread.is_alive():
            return EngineHealth(False, "the engine thread is not running")
        started = self._step_started
        if started is not None and time.monotonic() - started > stuck_after_s:
            return EngineHealth(False, f"an engine step has been running for {time.monotonic() - started:.0f} s")
        return EngineHealth(True, "ok")

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self) -> None:
        self._running = False
        self._commands.put(_Abort(""))
        self._thread.join(timeout=5)

    # -- engine thread ------------------------------------------------------------------------------------
    def _enqueue(self, command: _Add | _Call) -> None:
        """Queue a command whose caller waits for an answer; raises EngineDeadError at once if none will come."""
        with self._dead_lock:
            if self._dead is not None:
                raise self._dead
            self._commands.put(command)

    def _loop(self) -> None:
        try:
            while self._running:
                self._apply(self._commands.get())  # block while idle
                while self._running and (self.engine.has_unfinished() or not self._commands.empty()):
                    while not self._commands.empty():
                        self._apply(self._commands.get_nowait())
                    self._step()
                self._stats = self.engine.stats()
        except Exception:  # a bug outside a step: nothing on this thread can be trusted to run again
            log.exception("the engine thread failed; every request now ends with an error")
            self._die()

    def _die(self) -> None:
        """Answer every waiting caller with EngineDeadError: the requests in flight, the queued commands, and (by
        `_enqueue`) every later one."""
        with self._dead_lock:
            self._dead = EngineDeadError("the engine stopped on an internal error and runs no more requests; "
                                         "the server log has the details")
            answers = [lambda s=sink: s(self._dead) for sink in self._sinks.values()]
            self._sinks.clear()
            while not self._commands.empty():
                command = self._commands.get_nowait()
                if isinstance(command, _Add):
                    answers.append(lambda c=command: c.sink(self._dead))
                elif isinstance(command, _Call):
                    answers.append(lambda c=command: c.done(error=self._dead))
            for answer in answers:
                with contextlib.suppress(RuntimeError):  # that caller's event loop is already closed
                    answer()

    def _apply(self, command) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._sinks.pop(command.request_id, None)
        elif isinstance(command, _Stop):
            self.engine.stop_sequence(command.request_id, command.index)
            if command.request_id not in self.engine.requests:
                self._sinks.pop(command.request_id, None)
        elif isinstance(command, _Call):
            try:
                result = command.fn(self.engine)
            except Exception as exc:  # the caller's function failed: its caller gets the error
                command.done(error=exc)
            else:
                command.done(result)
        elif isinstance(command, _FailAll):
            self._refusal = command.error
            self._fail_all(command.error)
        self._stats = self.engine.stats()

    def _add(self, command: _Add) -> None:
        if self._refusal is not None:
            command.sink(self._refusal)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except Exception as exc:  # validation errors go back to that request only
            command.sink(exc)
            return
        self._sinks[command.request_id] = command.sink

    def _fail_all(self, error: Exception) -> None:
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort_request(request_id)
            sink(error)
        self._sinks.clear()

    def _step(self) -> None:
        if not self.engine.has_unfinished():
            return
        self._step_started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception:  # an engine bug (per-request failures come back as outputs): fail the requests in flight
            log.exception("engine step failed; aborting %d requests", len(self._sinks))
            self._fail_all(EngineDeadError("the engine failed on an internal error while running this request, "
                                           "which was aborted; the server log has the details"))
            return
        finally:
            self._step_started = None
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.error is not None:  # this request's own failure (its input); the others run on
                sink(out.error)
                del self._sinks[out.request_id]
                continue
            sink(out)
            if out.finished:
                del self._sinks[out.request_id]
        self._stats = self.engine.stats()
