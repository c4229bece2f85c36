"""Graceful shutdown: on SIGTERM (or Ctrl-C) stop accepting, let requests in flight finish for a grace period,
then end each one left with a proper error, and exit once every response is out.

    SIGTERM -> uvicorn closes the listening socket and idle connections; Serving.stop_admitting (new requests on
               open connections get 503)
            -> up to `grace_s`: requests run on and finish normally
            -> Serving.end_all: each request still running ends with 503 (a stream with an error event and [DONE])
            -> exit when the last response is sent (uvicorn cancels whatever is left `_ANSWER_S` later)
"""
from __future__ import annotations

import asyncio
import socket

import uvicorn

from freehold.server.serving import Serving

_ANSWER_S = 5.0  # after end_all, time for the error responses to reach their clients


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, serving: Serving, grace_s: float):
        config.timeout_graceful_shutdown = grace_s + _ANSWER_S
        super().__init__(config)
        self.serving = serving
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.serving.stop_admitting()
        deadline = asyncio.get_running_loop().call_later(self.grace_s, self.serving.end_all)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()
