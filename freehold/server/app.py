"""The FastAPI application: routes, OpenAI-shaped error handling and the optional API-key check.

    HTTP request -> [CORS] -> BodySizeLimit -> APIKeyMiddleware -> route (parse, template, tokenize: `params`,
                 `Serving.encode_*`) -> Serving.run (AsyncEngine on its own thread) -> text deltas -> JSON or SSE

CORS (only with `--allowed-origins`) wraps everything so that the 413, 401 and 400 a browser reads carry its
headers too; it reads no body, so the body-size limit is still the first to see one.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from freehold.server import (chat, completions, conversations, embeddings, memories, response_store, responses,
                             routes, tokenization)
from freehold.server.auth import OPEN_PATHS, APIKeyMiddleware
from freehold.server.cors import CorsPolicy, install_cors
from freehold.server.errors import install_error_handlers
from freehold.server.limits import BodySizeLimit
from freehold.server.serving import Serving
from freehold.server.streaming import ClientDisconnected, disconnected_response
from freehold.server.ui.page import load_static, page_paths, ui_router


def create_app(serving: Serving, api_key: str | None = None, cors: CorsPolicy | None = None,
               ui: bool = True) -> FastAPI:
    """`ui`: serve the chat page at / (freehold.server.ui.page; `freehold serve --no-ui` turns it off)."""
    app = FastAPI(title="Freehold", summary="OpenAI-compatible LLM inference server", version="0.1.0")
    app.state.serving = serving
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, _client_disconnected)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(routes.router)
    app.include_router(tokenization.router)
    app.include_router(embeddings.router)
    app.include_router(responses.router)
    app.include_router(response_store.router)
    app.include_router(conversations.router)
    app.include_router(memories.router)
    open_paths = OPEN_PATHS
    if ui:
        files = load_static()
        app.include_router(ui_router(files))
        open_paths |= page_paths(files)
    if serving.retrieval is not None:  # set only when the retrieval extra imports (freehold.server.main)
        from freehold.server import vector_stores
        app.include_router(vector_stores.router)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=open_paths)
    app.add_middleware(BodySizeLimit, max_bytes=serving.limits.max_request_bytes)  # before any reads
    if cors is not None:
        install_cors(app, cors)  # added last: outermost
    return app


async def _client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
    return disconnected_response()
