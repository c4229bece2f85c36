"""Plain Python functions as tools: the JSON Schema of the arguments comes from the type hints (pydantic) and the
docstring (its first paragraph describes the tool, a Google-style `Args:` section each parameter); arguments are
validated against it before the function runs.

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''The current weather in a city.

        Args:
            city: the city's name, e.g. "Paris".
        '''

A `FunctionTool` without a function is a client tool: the loop hands its calls back instead of running them
(the Responses API's `function` tools).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pydantic

from freehold.tools.spec import NAME_PATTERN

_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters):\s*$")
_SECTION = re.compile(r"^\s*(Returns|Raises|Yields|Examples?|Notes?):\s*$")
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


class ToolArgumentError(ValueError):
    """The arguments of a call do not match the tool's schema; the message says which and why."""


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: dict[str, Any]  # an object JSON Schema
    function: Callable[..., Any] | None = None  # None: a client tool (the loop does not run it)
    timeout: float | None = None  # seconds; None: Limits.tool_timeout
    _model: type[pydantic.BaseModel] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be an object schema")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"tool {self.name!r}: timeout must be positive, got {self.timeout}")

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)

    def as_openai(self) -> dict[str, Any]:
        """The tool as a chat completions request offers it."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def validate(self, arguments: Any) -> dict[str, Any]:
        """The keyword arguments of a call (parsed JSON), validated: ToolArgumentError names each problem."""
        if not isinstance(arguments, dict):
            raise ToolArgumentError(f"arguments must be a JSON object, got {type(arguments).__name__}")
        if self._model is None:  # a schema given by hand: only its top-level shape is checked here
            missing = [p for p in self.parameters.get("required", []) if p not in arguments]
            if missing:
                raise ToolArgumentError(f"missing required argument(s): {', '.join(missing)}")
            return dict(arguments)
        try:
            model = self._model.model_validate(arguments)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(arguments)'}: {e['msg']}"
                                 for e in exc.errors())
            raise ToolArgumentError(problems) from None
        return {name: getattr(model, name) for name in type(model).model_fields}


def function_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
                  timeout: float | None = None) -> FunctionTool:
    """A tool from a function's signature and docstring. Every parameter needs a type hint; *args/**kwargs are
    refused (the model can only pass named JSON values)."""
    summary, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
    fields: dict[str, Any] = {}
    hints = _hints(fn)
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"{fn.__name__}: *args and **kwargs cannot be tool parameters")
        if param.name not in hints:
            raise ValueError(f"{fn.__name__}: parameter {param.name!r} needs a type hint (it becomes the schema)")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], pydantic.Field(default, description=arg_docs.get(param.name)))
    model = pydantic.create_model(f"{fn.__name__}_arguments", __config__=pydantic.ConfigDict(extra="forbid"),
                                  **fields)
    return FunctionTool(name=name or fn.__name__, description=description or summary,
                        parameters=_clean_schema(model.model_json_schema()), function=fn, timeout=timeout,
                        _model=model)


def as_tool(tool: Callable[..., Any] | FunctionTool) -> FunctionTool:
    return tool if isinstance(tool, FunctionTool) else function_tool(tool)


def client_tool(name: str, description: str = "", parameters: dict[str, Any] | None = None) -> FunctionTool:
    """A tool the caller runs (OpenAI-shaped schema given as is): the loop returns its calls."""
    return FunctionTool(name=name, description=description, parameters=parameters or {"type": "object"})


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the first paragraph, {parameter: description}) of a Google-style docstring."""
    lines = doc.splitlines()
    summary_lines: list[str] = []
    for line in lines:
        if not line.strip() or _ARGS_HEADER.match(line):
            break
        summary_lines.append(line.strip())
    args: dict[str, str] = {}
    current: str | None = None
    in_args = False
    for line in lines:
        if _ARGS_HEADER.match(line):
            in_args, current = True, None
        elif in_args and _SECTION.match(line):
            in_args = False
        elif in_args and (m := _ARG_LINE.match(line)) and _indent(line) <= _args_indent(lines):
            current = m.group(1).lstrip("*")
            args[current] = m.group(2).strip()
        elif in_args and current is not None and line.strip():
            args[current] = f"{args[current]} {line.strip()}".strip()
    return " ".join(summary_lines), args


def _args_indent(lines: list[str]) -> int:
    """The indent of the first entry under `Args:`."""
    for i, line in enumerate(lines):
        if _ARGS_HEADER.match(line):
            for entry in lines[i + 1:]:
                if entry.strip():
                    return _indent(entry)
    return 0


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return inspect.get_annotations(fn, eval_str=True)
    except Exception as exc:  # a hint naming something undefined
        raise ValueError(f"{getattr(fn, '__name__', fn)}: cannot read its type hints: {exc}") from exc


def _clean_schema(schema: Any) -> Any:
    """pydantic's schema without `title`s (noise in the prompt); everything else as generated."""
    if isinstance(schema, dict):
        return {k: _clean_schema(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_clean_schema(v) for v in schema]
    return schema
