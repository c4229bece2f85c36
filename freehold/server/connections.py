"""Connections that cannot pin the server: a deadline for reading each request, a cap on open connections, the
file-descriptor limit raised at startup, and "Too many open files" logged at most once per interval.

uvicorn closes a connection that idles *between* requests (`timeout_keep_alive`), but a connection that never
sends a byte, or sends half a request and stalls (slowloris), stays open forever. `GuardedH11Protocol` gives each
request a deadline: from the connection's opening (or, on a kept-alive connection, from the first byte of the next
request) until its headers and body have arrived. A request not read in time gets 408 and the connection closes.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import time

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from freehold.server.errors import error_body, error_response
from freehold.server.limits import ServerLimits

_RESERVED_FDS = 256  # model files, pipes, threads' eventfds, log files


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request read deadline and a connection cap (see the module docstring).

    Open connections beyond `max_connections` get 503 (in OpenAI's error shape) for their request and close;
    beyond twice that, a new connection is closed at once without reading it, so sockets stay bounded."""

    limits: ServerLimits  # set by `protocol_class`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_deadline: asyncio.TimerHandle | None = None
        num_open = len(self.connections)
        if num_open > 2 * self.limits.max_connections:
            transport.close()
            return
        if num_open > self.limits.max_connections:
            self.app = _overloaded
        self._arm_read_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_request():
            self._arm_read_deadline()  # a new request began on a kept-alive connection: its clock starts now
        else:
            self._disarm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def _reading_request(self) -> bool:
        """True until the current request's headers and body have all arrived."""
        cycle = self.cycle
        return cycle is None or cycle.response_complete or cycle.more_body

    def _arm_read_deadline(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.limits.request_read_timeout_s, self._read_timed_out)

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or not self._reading_request():
            return
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # nothing answered this request yet
            self.transport.write(_timeout_response(self.limits.request_read_timeout_s))
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app sees http.disconnect and stops waiting for the body
            cycle.message_event.set()
        self.transport.close()


def protocol_class(limits: ServerLimits) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http=` setting, bound to `limits`."""
    return type("FreeholdH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def _timeout_response(timeout_s: float) -> bytes:
    """A raw 408: the request was never parsed, so no ASGI response cycle exists to send it."""
    body = json.dumps(error_body(408, f"the request was not received within {timeout_s:g} s "
                                      "(freehold serve --request-read-timeout)", code="request_timeout")).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


async def _overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    """The app of a connection over the cap."""
    response = error_response(503, "the server has too many open connections; retry later",
                              code="too_many_connections", headers={"Retry-After": "1", "Connection": "close"})
    await response(scope, receive, send)


# ---- file descriptors -----------------------------------------------------------------------------------------------
def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (many hosts default to 1024); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the old limit: the connection cap below still fits it
    return soft


def connections_that_fit(max_connections: int, open_file_limit: int) -> int:
    """The largest cap whose worst case (twice the cap, see GuardedH11Protocol) fits the descriptor limit."""
    return max(1, min(max_connections, (open_file_limit - _RESERVED_FDS) // 2))


class RateLimitedFilter(logging.Filter):
    """Lets one "Too many open files" record through per `interval_s` (noting how many were dropped); other records
    pass. Without it, a server out of descriptors logs the failed accept() as fast as it retries."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not _out_of_descriptors(record):
            return True
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            self._suppressed += 1
            return False
        if self._suppressed:
            record.msg = f"{record.msg} ({self._suppressed} similar messages suppressed)"
        self._last, self._suppressed = now, 0
        return True


def install_log_rate_limit(interval_s: float = 10.0) -> RateLimitedFilter:
    """Attach one shared filter to the loggers that report failed accepts (asyncio's loop, uvicorn)."""
    shared = RateLimitedFilter(interval_s)
    for name in ("asyncio", "uvicorn.error", "freehold.server"):
        logging.getLogger(name).addFilter(shared)
    return shared


def _out_of_descriptors(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return True
    return "Too many open files" in record.getMessage()
