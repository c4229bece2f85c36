"""GET / and GET /ui/<file>: the chat page, static files shipped in the package (no build step, no CDN).

The page is a client of the public API like any other: it calls /v1/models, /v1/chat/completions (streamed) and
/debug/engine with the API key the user types in, sent as `Authorization: Bearer` (never in a URL). The page's own
files are open without the key (`freehold.server.auth`: exactly the paths of `page_paths`): they hold no data, only
the page's code.

Every response carries a strict Content-Security-Policy: scripts and styles only from this origin (no inline script,
no eval), requests only to this origin, no frames, forms or plugins. Model output is untrusted: the page renders it
as Markdown through DOMPurify (static/markdown.js); the policy is the second line of defence.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from starlette.responses import Response

from freehold.errors import FreeholdError
from freehold.server.errors import error_response

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/ui/"
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "connect-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"))
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                  ".svg": "image/svg+xml"}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str


def load_static(directory: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """Every servable file under `directory` by its path relative to it ('app.js', 'vendor/marked.esm.js'); read
    once, so a request can only name a file listed here (no path from the URL reaches the file system)."""
    files = {path.relative_to(directory).as_posix(): StaticFile(path.read_bytes(), _CONTENT_TYPES[path.suffix])
             for path in sorted(directory.rglob("*")) if path.is_file() and path.suffix in _CONTENT_TYPES}
    if "index.html" not in files:
        raise FreeholdError(f"the chat page is missing from the installed package: no {directory / 'index.html'}")
    return files


def page_paths(files: dict[str, StaticFile]) -> frozenset[str]:
    """The exact paths `ui_router(files)` serves a file at: what the API-key check leaves open."""
    return frozenset({"/"} | {PREFIX + name for name in files if name != "index.html"})


def ui_router(files: dict[str, StaticFile]) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def index() -> Response:
        return _respond(files["index.html"])

    @router.get(PREFIX + "{name:path}")
    async def static_file(name: str) -> Response:
        found = files.get(name)
        if found is None or name == "index.html":
            return error_response(404, f"no such file of the chat page: {name!r}", code="not_found")
        return _respond(found)

    return router


def _respond(file: StaticFile) -> Response:
    return Response(file.body, media_type=file.content_type, headers=SECURITY_HEADERS)
