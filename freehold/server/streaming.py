"""Server-sent events and client-disconnect handling.

A streamed response ends its engine request as soon as the client goes away: Starlette cancels the streaming
task on `http.disconnect`, and `EventStreamResponse` then closes the body generator explicitly, so the engine
request is aborted (and its KV freed) even when the cancellation landed in a `send` rather than in the generator.
A non-streamed request is raced against the disconnect by `until_disconnected`.
"""
from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    """One SSE event. Pydantic payloads drop fields never set, so a delta carries only what changed."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude_unset=True)
    else:
        body = json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], headers: dict[str, str] | None = None):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (raises ClientDisconnected)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def disconnected_response() -> Response:
    return Response(status_code=499)  # nobody reads it; nginx's "client closed request"


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Interleave several async iterators as their items arrive; closing the merge closes every stream."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream) as s:  # type: ignore[type-var]
                async for item in s:
                    await queue.put(("item", item))
            await queue.put(("done", None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(("error", exc))

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            kind, value = await queue.get()
            if kind == "item":
                yield value  # type: ignore[misc]
            elif kind == "done":
                remaining -= 1
            else:
                raise value  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
