"""Structured-output request fields -> the one `ConstraintSpec` a request asks for, and the field that asked.

    response_format {"type": "json_object"}                          OpenAI    -> JsonObject
    response_format {"type": "json_schema", "json_schema": {...}}    OpenAI    -> JsonSchema
    guided_json / guided_regex / guided_grammar / guided_choice      vLLM      -> JsonSchema / Regex / Grammar / Choice
    structured_outputs {"json" | "regex" | "grammar" | "choice" | "json_object": ...}   vLLM's newer spelling

A request may set at most one of them; `response_format {"type": "text"}` asks for nothing. The spec is compiled
by `Serving.compile_constraint` off the event loop; its errors name the field given here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from freehold.constrain.spec import Choice, ConstraintSpec, Grammar, JsonObject, JsonSchema, Regex
from freehold.errors import InvalidRequestError
from freehold.server.protocol import ResponseFormat, SamplingFields, StructuredOutputs

MAX_CHOICES = 256


class RequestedConstraint(NamedTuple):
    spec: ConstraintSpec
    param: str  # the request field that asked for it, as errors name it


def requested_constraint(request: SamplingFields) -> RequestedConstraint | None:
    """The structured-output constraint of a request, or None for free text."""
    found = [c for c in (_response_format(request.response_format), *_guided(request),
                         *_structured_outputs(request.structured_outputs)) if c is not None]
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise InvalidRequestError(f"set at most one structured output field, got {names}", param=found[1].param)
    return found[0] if found else None


def _response_format(fmt: ResponseFormat | None) -> RequestedConstraint | None:
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise InvalidRequestError("json_schema is only allowed with type 'json_schema'",
                                      param="response_format.json_schema")
        return None
    if fmt.type == "json_object":
        return RequestedConstraint(JsonObject(), "response_format")
    if fmt.json_schema is None:
        raise InvalidRequestError("response_format of type 'json_schema' needs a 'json_schema' object "
                                  "with 'name' and 'schema'", param="response_format.json_schema")
    schema = fmt.json_schema.schema_
    return _requested("response_format.json_schema.schema", lambda: JsonSchema.from_value(schema))


def _guided(r: SamplingFields) -> list[RequestedConstraint | None]:
    return [_optional("guided_json", r.guided_json, JsonSchema.from_value),
            _optional("guided_regex", r.guided_regex, Regex),
            _optional("guided_grammar", r.guided_grammar, Grammar),
            _optional("guided_choice", r.guided_choice, _choice)]


def _structured_outputs(s: StructuredOutputs | None) -> list[RequestedConstraint | None]:
    if s is None:
        return []
    p = "structured_outputs"
    found = [_optional(f"{p}.json", s.json_, JsonSchema.from_value),
             _optional(f"{p}.regex", s.regex, Regex),
             _optional(f"{p}.grammar", s.grammar, Grammar),
             _optional(f"{p}.choice", s.choice, _choice),
             RequestedConstraint(JsonObject(), f"{p}.json_object") if s.json_object else None]
    if not any(found):
        raise InvalidRequestError("structured_outputs must set one of json, regex, grammar, choice, json_object",
                                  param=p)
    return found


def _optional(param: str, value: Any, build: Callable[[Any], ConstraintSpec]) -> RequestedConstraint | None:
    return None if value is None else _requested(param, lambda: build(value))


def _requested(param: str, build: Callable[[], ConstraintSpec]) -> RequestedConstraint:
    """The spec `build` makes, with its validation errors naming `param`."""
    try:
        return RequestedConstraint(build(), param)
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), param=param) from None


def _choice(options: list[str]) -> Choice:
    if not options:
        raise InvalidRequestError("the list of choices is empty")
    if len(options) > MAX_CHOICES:
        raise InvalidRequestError(f"at most {MAX_CHOICES} choices, got {len(options)}")
    return Choice(tuple(options))
