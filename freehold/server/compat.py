"""Fields no OpenAI or vLLM document defines: what a request's unknown fields do.

Clients add fields freely (`extra_body`, framework defaults, other servers' extensions). Each request field falls
in one of four groups (the declarations are in `freehold.server.protocol`):

    implemented                 changes the output as documented
    accepted                    documented, no effect on the output (`user`, `store`, `metadata`, `service_tier`)
    refused                     documented, but Freehold cannot honour it (`audio`, ...): 400 naming the field
    unknown                     no document defines it: ignored; the server logs a warning and the response
                                carries `X-Freehold-Ignored-Fields: a, messages[0].b`; with --strict-api a 400

vLLM behaves the same way for unknown fields (ignored with a warning); the header is Freehold's, so a client can
see what it sent in vain.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

from pydantic import BaseModel

from freehold.errors import InvalidRequestError

IGNORED_FIELDS_HEADER = "X-Freehold-Ignored-Fields"
_MAX_HEADER_FIELDS = 32  # a header is no place for an unbounded list
_MAX_NAME_CHARS = 128  # nor for a client's megabyte-long field name (clients refuse headers over ~16 KiB)
log = logging.getLogger("freehold.server")


def pop_unknown_fields(body: BaseModel, strict: bool) -> list[str]:
    """The paths of `body`'s unknown fields (nested models included), removed from it so that nothing downstream
    sees them. With `strict`, the first one is an InvalidRequestError naming it instead."""
    found = list(_unknown(body, ""))
    if found and strict:
        raise InvalidRequestError(f"unknown field '{found[0]}' (this server runs with --strict-api)",
                                  param=found[0])
    if found:
        log.warning("ignored unknown request fields: %s", ", ".join(map(_printable, found[:_MAX_HEADER_FIELDS])))
    return found


def ignored_fields_headers(fields: list[str]) -> dict[str, str]:
    """The response header that lists the ignored fields (none if there were none)."""
    if not fields:
        return {}
    shown = [_printable(f) for f in fields[:_MAX_HEADER_FIELDS]] + (
        [f"... {len(fields) - _MAX_HEADER_FIELDS} more"] if len(fields) > _MAX_HEADER_FIELDS else [])
    return {IGNORED_FIELDS_HEADER: ", ".join(shown)}


def _printable(name: str) -> str:
    """A client's field name, shortened, as printable ASCII: header values may hold no CR/LF or other control
    characters (h11 refuses the whole response otherwise) and log lines should not either."""
    return name[:_MAX_NAME_CHARS].encode("unicode_escape").decode("ascii")


def _unknown(model: BaseModel, where: str) -> Iterator[str]:
    extra = model.__pydantic_extra__
    if extra:
        yield from (f"{where}{name}" for name in extra)
        extra.clear()
    for name in type(model).model_fields:
        yield from _unknown_in(getattr(model, name), f"{where}{name}")


def _unknown_in(value: object, where: str) -> Iterator[str]:
    if isinstance(value, BaseModel):
        yield from _unknown(value, where + ".")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, BaseModel):
                yield from _unknown(item, f"{where}[{i}].")
