"""API-key check: with a key configured, /v1, /admin and /debug require `Authorization: Bearer <key>`.

A plain ASGI middleware (not a route dependency) so that the key is checked before the body is parsed, and
streaming responses pass through untouched. /health, /metrics and the OpenAPI docs stay open.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from freehold.server.errors import error_response

PROTECTED_PREFIXES = ("/v1", "/admin", "/debug")


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]) and not self._authorized(scope):
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


def _protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)
