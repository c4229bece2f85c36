"""What a request offers and asks for: `tools`, `tool_choice`, `parallel_tool_calls` validated into a ToolRequest.

Names follow OpenAI's rule (^[a-zA-Z0-9_-]{1,64}$), so a name needs no escaping in the call syntax. A tool's
`parameters` must be an object schema that the grammar engine enforces in full (the same rules as
`response_format`: freehold.constrain.schema_support); absent parameters mean "no arguments beyond an object".
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from freehold.constrain.schema_support import check_schema_support
from freehold.constrain.spec import JsonSchema
from freehold.errors import InvalidRequestError

NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolSpec:
    """One offered function."""

    name: str
    description: str
    parameters: JsonSchema  # an object schema; {"type": "object"} when the tool gives none
    strict: bool = False

    def as_openai(self) -> dict[str, Any]:
        """The tool as OpenAI (and chat templates that take `tools`) spell it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters.schema}}


class ToolChoiceMode(enum.Enum):
    NONE = "none"  # no call may be made (and the tools are not shown to the model)
    AUTO = "auto"  # text, calls, or both
    REQUIRED = "required"  # at least one call, from the first token
    FUNCTION = "function"  # exactly one call, of `ToolRequest.function`


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[ToolSpec, ...]
    mode: ToolChoiceMode
    function: str | None  # the forced name when mode is FUNCTION
    parallel: bool  # parallel_tool_calls: several calls in one turn (False: at most one)

    @property
    def callable_tools(self) -> tuple[ToolSpec, ...]:
        """The tools a call may name under this mode."""
        if self.mode is ToolChoiceMode.NONE:
            return ()
        if self.mode is ToolChoiceMode.FUNCTION:
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools

    @property
    def max_calls(self) -> int | None:
        """None: no limit."""
        if self.mode is ToolChoiceMode.NONE:
            return 0
        return 1 if self.mode is ToolChoiceMode.FUNCTION or not self.parallel else None


def tool_request(tools: list[dict] | None, tool_choice: str | dict | None, parallel_tool_calls: bool | None,
                 param_prefix: str = "") -> ToolRequest | None:
    """The validated request (OpenAI-shaped dicts as given in JSON), or None when nothing is offered and no call is
    asked for. InvalidRequestError names the offending field (`param_prefix` + "tools[1].function.name")."""
    specs = tuple(_tool(t, f"{param_prefix}tools[{i}]") for i, t in enumerate(tools or []))
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise InvalidRequestError(f"tools[{i}] repeats the function name {spec.name!r}: names must be unique",
                                      param=f"{param_prefix}tools[{i}].function.name")
        seen.add(spec.name)
    mode, function = _choice(tool_choice, specs, f"{param_prefix}tool_choice")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError("parallel_tool_calls must be a boolean", param=f"{param_prefix}parallel_tool_calls")
    if not specs and mode is ToolChoiceMode.NONE:
        return None
    return ToolRequest(specs, mode, function, parallel_tool_calls is not False)


def _tool(tool: Any, param: str) -> ToolSpec:
    if not isinstance(tool, dict):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    if tool.get("type", "function") != "function":
        raise InvalidRequestError(f"{param}.type must be 'function', got {tool.get('type')!r}", param=f"{param}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequestError(f"{param}.function must be an object", param=f"{param}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{param}.function has no name", param=f"{param}.function.name")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequestError(f"the function name {name!r} must be 1 to 64 letters, digits, '_' or '-'",
                                  param=f"{param}.function.name")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequestError(f"{param}.function.description must be a string",
                                  param=f"{param}.function.description")
    return ToolSpec(name, description, _parameters(function.get("parameters"), f"{param}.function.parameters"),
                    bool(function.get("strict")))


def _parameters(schema: Any, param: str) -> JsonSchema:
    if schema is None:
        return JsonSchema.from_value({"type": "object"})
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise InvalidRequestError(f"{param} must be a JSON Schema with \"type\": \"object\" (the arguments are "
                                  "a JSON object)", param=param)
    try:
        spec = JsonSchema.from_value(schema)
        check_schema_support(schema)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{param}: {exc}", param=param) from None
    return spec


def _choice(choice: Any, specs: tuple[ToolSpec, ...], param: str) -> tuple[ToolChoiceMode, str | None]:
    if choice is None:
        return (ToolChoiceMode.AUTO if specs else ToolChoiceMode.NONE), None
    if isinstance(choice, str):
        try:
            mode = ToolChoiceMode(choice)
        except ValueError:
            mode = ToolChoiceMode.FUNCTION  # never valid as a string
        if mode is ToolChoiceMode.FUNCTION:
            raise InvalidRequestError(f"{param} must be 'none', 'auto', 'required' or "
                                      f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice!r}",
                                      param=param)
        if mode is ToolChoiceMode.REQUIRED and not specs:
            raise InvalidRequestError(f"{param} is 'required' but no tools are given", param=param)
        return (mode if specs else ToolChoiceMode.NONE), None  # "auto" with no tools: nothing to call
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise InvalidRequestError(f"{param} must name a function: {{\"type\": \"function\", \"function\": "
                                  "{\"name\": ...}}", param=param)
    if name not in {s.name for s in specs}:
        raise InvalidRequestError(f"{param} names the function {name!r}, which is not among the tools",
                                  param=f"{param}.function.name")
    return ToolChoiceMode.FUNCTION, name
