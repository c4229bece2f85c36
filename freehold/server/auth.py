"""API-key check: with a key configured, every route but /health, /metrics, the OpenAPI docs and the chat page's
files (/ and /ui/<file> for each file it ships: code only, no data; the page sends the key the user types in)
requires `Authorization: Bearer <key>` (deny by default: a route added later is protected without being listed).
Open paths are exact, never prefixes, and are matched against the path the router will route (the request path less
the ASGI root_path), so no spelling of a path (`//v1/models`, `/ui/../v1/models`, a root_path) reaches a protected
route without the key.

A plain ASGI middleware (not a route dependency) so that the key is checked before the body is parsed, and
streaming responses pass through untouched. /health, /metrics and the OpenAPI docs stay open, and so does a CORS
preflight (`OPTIONS` with `Access-Control-Request-Method`): browsers never attach credentials to it, and it reaches
no route (the CORS middleware answers it, or the router refuses the method).
"""
from __future__ import annotations

import hmac

from starlette._utils import get_route_path  # what the router matches routes against
from starlette.types import ASGIApp, Receive, Scope, Send

from freehold.server.errors import error_response

OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class APIKeyMiddleware:
    """`open_paths`: the exact paths served without the key (create_app adds the chat page's files to OPEN_PATHS)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._needs_key(scope) and not self._authorized(scope):
            response = error_response(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _needs_key(self, scope: Scope) -> bool:
        return get_route_path(scope) not in self._open_paths and not _preflight(scope)

    def _authorized(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        return hmac.compare_digest(given, self._expected)


def _preflight(scope: Scope) -> bool:
    return scope["method"] == "OPTIONS" and any(name == b"access-control-request-method"
                                                for name, _ in scope["headers"])
