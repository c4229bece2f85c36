"""Every error leaves the server in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Bad input is a 4xx with a message naming the problem, never a 500: FastAPI's validation and body-parsing errors,
Freehold's own `FreeholdError`s and HTTP errors (unknown route, wrong method) all pass through here.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from freehold.errors import FreeholdError, InvalidRequestError, NotFoundError, PromptTooLongError
from freehold.server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("freehold.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "overloaded_error"}


class APIError(Exception):
    """An HTTP error raised by a route: status, message and the OpenAI `param` / `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class QueueFullError(APIError):
    def __init__(self, num_waiting: int, retry_after_s: int = 1):
        super().__init__(503, f"the server is overloaded: {num_waiting} requests are already waiting; "
                              f"retry after {retry_after_s} s", code="queue_full",
                         headers={"Retry-After": str(retry_after_s)})


class ServerShuttingDownError(FreeholdError):
    """The server is shutting down: a new request is refused, and one still running when the grace period ends
    is ended with this error (503; an error event on a stream)."""

    def __init__(self, message: str = "the server is shutting down; retry on another instance"):
        super().__init__(message)


class GrammarCompilerBusyError(APIError):
    def __init__(self, num_compiling: int, param: str, retry_after_s: int = 1):
        super().__init__(503, f"the grammar compiler is busy: {num_compiling} compiles are running or queued; "
                              f"retry after {retry_after_s} s", param=param, code="grammar_compiler_busy",
                         headers={"Retry-After": str(retry_after_s)})


class GrammarCompileTimeoutError(APIError):
    def __init__(self, timeout_s: float, param: str):
        super().__init__(400, f"compiling the grammar for {param} took longer than {timeout_s:g} s "
                              "(freehold serve --grammar-compile-timeout); simplify it. The compile goes on in the "
                              "background and a later identical request uses its result", param=param,
                         code="grammar_compile_timeout")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(PromptTooLongError, _prompt_too_long)
    app.add_exception_handler(FreeholdError, _freehold_error)
    app.add_exception_handler(Exception, _internal_error)


def freehold_error_body(exc: FreeholdError, prompt_param: str) -> tuple[int, dict[str, Any]]:
    """Status and body for a FreeholdError (also sent as an SSE event when it surfaces mid-stream)."""
    if isinstance(exc, PromptTooLongError):
        return 400, error_body(400, str(exc), prompt_param, "context_length_exceeded")
    if isinstance(exc, ServerShuttingDownError):
        return 503, error_body(503, str(exc), code="server_shutting_down")
    if isinstance(exc, NotFoundError):
        return 404, error_body(404, str(exc), exc.param, "not_found")
    param = exc.param if isinstance(exc, InvalidRequestError) else None
    return 400, error_body(400, str(exc), param)


# ---- handlers -----------------------------------------------------------------------------------------------------
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_errors(list(exc.errors()))
    return error_response(400, message, param)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        message = "the request body could not be parsed: not UTF-8, or JSON nested too deeply"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _prompt_too_long(request: Request, exc: PromptTooLongError) -> JSONResponse:
    status, body = freehold_error_body(exc, _prompt_param(request))
    return JSONResponse(body, status_code=status)


async def _freehold_error(request: Request, exc: FreeholdError) -> JSONResponse:
    status, body = freehold_error_body(exc, _prompt_param(request))
    return JSONResponse(body, status_code=status)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal server error: {type(exc).__name__}")


def _prompt_param(request: Request) -> str:
    return "messages" if request.url.path.endswith("/chat/completions") else "prompt"


# ---- validation messages ------------------------------------------------------------------------------------------
def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message (and the offending field) for pydantic's error list."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "malformed JSON")
        where = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return f"the request body is not valid JSON: {reason}{where}", None
    if not loc:
        if first.get("type") == "missing":
            return "the request body is missing: send a JSON object with Content-Type: application/json", None
        return "the request body must be a JSON object (sent with Content-Type: application/json)", None
    param = _param_name(loc)
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{param}': Freehold does not recognize it", param
    if first.get("type") == "missing":
        return f"'{param}' is required", param
    same_field = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
    if len(same_field) > 1:  # a union such as `prompt` or `stop`: pydantic reports every alternative
        return f"'{loc[0]}' has the wrong type or shape (got {_short(same_field[0].get('input'))})", str(loc[0])
    return f"'{param}': {first.get('msg', 'invalid value')} (got {_short(first.get('input'))})", param


def _param_name(loc: list[Any]) -> str:
    """("messages", 0, "content") -> "messages[0].content", dropping pydantic's union-branch labels."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in str(part) or str(part) in ("str", "int", "float", "bool", "list", "dict"):
            continue  # a union member such as 'list[int]'
        else:
            name += f".{part}" if name else str(part)
    return name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
