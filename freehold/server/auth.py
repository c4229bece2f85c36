"""API-key check: with a key configured, every route but /health, /metrics and the OpenAPI docs requires
`Authorization: Bearer <key>` (deny by default: a route added later is protected without being listed).

A plain ASGI middleware (not a route dependency) so that the key is checked before the body is parsed, and
streaming responses pass through untouched. /health, /metrics and the OpenAPI docs stay open, and so does a CORS
preflight (`OPTIONS` with `Access-Control-Request-Method`): browsers never attach credentials to it, and it reaches
no route (the CORS middleware answers it, or the router refuses the method).
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from freehold.server.errors import error_response

OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _needs_key(scope) and not self._authorized(scope):
            response = error_response(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        return hmac.compare_digest(given, self._expected)


def _needs_key(scope: Scope) -> bool:
    return _protected(scope["path"]) and not _preflight(scope)


def _preflight(scope: Scope) -> bool:
    return scope["method"] == "OPTIONS" and any(name == b"access-control-request-method"
                                                for name, _ in scope["headers"])


def _protected(path: str) -> bool:
    return path not in OPEN_PATHS
