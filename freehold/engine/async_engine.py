"""The engine on its own thread, with an asyncio streaming interface for the server.

The engine is touched only by its thread. Callers enqueue commands (add, abort, reset); the thread applies them
between steps and pushes each RequestOutput to the request's asyncio queue through the caller's event loop.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from freehold.engine.engine import Engine, EngineStats
from freehold.types import RequestOutput, SamplingParams

log = logging.getLogger("freehold.engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed while running this request (a bug, not bad input)."""


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
    done: Callable[[object], None]


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Callable[[RequestOutput | Exception], None]] = {}
        self._stats = engine.stats()
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
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, sink))
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
        self._commands.put(_Call(fn, lambda r: loop.call_soon_threadsafe(future.set_result, r)))
        return await future

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self) -> None:
        self._running = False
        self._commands.put(_Abort(""))
        self._thread.join(timeout=5)

    # -- engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._running:
            self._apply(self._commands.get())  # block while idle
            while self._running and (self.engine.has_unfinished() or not self._commands.empty()):
                while not self._commands.empty():
                    self._apply(self._commands.get_nowait())
                self._step()
            self._stats = self.engine.stats()

    def _apply(self, command) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
            except Exception as exc:  # validation errors go back to that request only
                command.sink(exc)
                return
            self._sinks[command.request_id] = command.sink
        elif isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._sinks.pop(command.request_id, None)
        elif isinstance(command, _Stop):
            self.engine.stop_sequence(command.request_id, command.index)
            if command.request_id not in self.engine.requests:
                self._sinks.pop(command.request_id, None)
        elif isinstance(command, _Call):
            command.done(command.fn(self.engine))
        self._stats = self.engine.stats()

    def _step(self) -> None:
        if not self.engine.has_unfinished():
            return
        try:
            outputs = self.engine.step()
        except Exception as exc:  # an engine bug: fail the requests in flight, keep serving new ones
            log.exception("engine step failed; aborting %d requests", len(self._sinks))
            for request_id, sink in list(self._sinks.items()):
                self.engine.abort_request(request_id)
                sink(EngineDeadError(f"engine step failed: {exc}"))
            self._sinks.clear()
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink(out)
                if out.finished:
                    del self._sinks[out.request_id]
        self._stats = self.engine.stats()
