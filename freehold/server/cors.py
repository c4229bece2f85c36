"""Cross-origin access for browser front-ends (`freehold serve --allowed-origins`), through Starlette's
`CORSMiddleware`: this module only validates the policy and hands it over.

Off unless origins are given. A browser lets a web page read a response from another origin only when the server
answers with `Access-Control-Allow-Origin`; without it (the default) pages can still make the request blind, but
never read the answer. Allowing "*" would let every page a user visits drive and read a local server that has no
API key (the default one binds 127.0.0.1 without a key), so the operator names the origins, or "*" knowingly.

The preflight (`OPTIONS` with `Access-Control-Request-Method`) never carries credentials, so it is answered without
the API key (`freehold.server.auth`); the real request still needs the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from freehold.server.compat import IGNORED_FIELDS_HEADER

ANY = "*"
DEFAULT_METHODS = ("GET", "POST")  # every route of the API; the preflight's OPTIONS is answered by the middleware
DEFAULT_HEADERS = (ANY,)  # the OpenAI SDKs send Authorization, Content-Type and their own x-stainless-* headers

# An origin as a browser sends it: scheme://host[:port], lowercase, no path, no trailing slash.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[a-z0-9.\-_~%!$&'()*+,;=:\[\]]+")
_METHOD = re.compile(r"[A-Za-z]+")
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token (RFC 9110)


@dataclass(frozen=True)
class CorsPolicy:
    """Which web origins may read responses, and which methods and request headers they may use ("*": any)."""

    allowed_origins: tuple[str, ...]
    allowed_methods: tuple[str, ...] = DEFAULT_METHODS
    allowed_headers: tuple[str, ...] = DEFAULT_HEADERS

    def __post_init__(self) -> None:
        if not self.allowed_origins:
            raise ValueError("a CORS policy needs at least one allowed origin")
        for origin in self.allowed_origins:
            check_origin(origin)
        for method in self.allowed_methods:
            check_method(method)
        for header in self.allowed_headers:
            check_header(header)

    @property
    def allows_any_origin(self) -> bool:
        return ANY in self.allowed_origins

    def middleware_options(self) -> dict[str, Any]:
        # allow_private_network: Chrome asks before a public page reaches a private address (the usual
        # http://localhost server); naming the page's origin is the operator's consent to exactly that.
        # expose_headers: a page reads only CORS-safelisted response headers unless the server names others.
        return {"allow_origins": self.allowed_origins, "allow_methods": self.allowed_methods,
                "allow_headers": self.allowed_headers, "allow_credentials": False, "allow_private_network": True,
                "expose_headers": (IGNORED_FIELDS_HEADER,)}


def install_cors(app: FastAPI, policy: CorsPolicy) -> None:
    """Add the CORS middleware outside every other one, so that the headers are on every response a browser reads:
    401 (API key), 413 (body size), 400s and the routes' own. It never reads the body."""
    app.add_middleware(CORSMiddleware, **policy.middleware_options())


def split_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (the flags take comma-separated values and may be repeated)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def check_origin(origin: str) -> str:
    if origin != ANY and _ORIGIN.fullmatch(origin) is None:
        raise ValueError(f"not an origin: {origin!r}; write it as a browser sends it, scheme://host[:port] in "
                         "lowercase without a path or trailing slash (e.g. http://localhost:3000), or * for any")
    return origin


def check_method(method: str) -> str:
    if method != ANY and (_METHOD.fullmatch(method) is None or method != method.upper()):
        raise ValueError(f"not an HTTP method: {method!r} (e.g. GET, POST; uppercase; or * for any)")
    return method


def check_header(header: str) -> str:
    if header != ANY and _HEADER.fullmatch(header) is None:
        raise ValueError(f"not an HTTP header name: {header!r} (e.g. Authorization, or * for any)")
    return header
