"""Built-in tools for the agent loop: `calculator` (exact arithmetic), `python` (a sandboxed subprocess),
`read_file` (text files under one folder) and `file_search` (vector stores). `builtin_tools` builds them by name,
as the CLI's `--tools calculator,python` asks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from freehold.agent.builtin.calculator import calculator
from freehold.agent.builtin.file_search import file_search_tool
from freehold.agent.builtin.files import read_file_tool
from freehold.agent.builtin.sandbox import PythonSandbox, python_tool
from freehold.agent.functions import FunctionTool, function_tool

BUILTIN_NAMES = ("calculator", "python", "read_file", "file_search")

__all__ = ["BUILTIN_NAMES", "PythonSandbox", "builtin_tools", "calculator", "file_search_tool", "python_tool",
           "read_file_tool"]


def builtin_tools(names: Sequence[str], *, root: Path | str | None = None, manager: Any = None,
                  vector_store_ids: Sequence[str] = (), python_limits: dict[str, Any] | None = None
                  ) -> list[FunctionTool]:
    """The named tools, in the order given. ValueError names an unknown tool, a repeated one, or what a tool lacks
    (read_file needs `root`; file_search needs `manager` and `vector_store_ids`)."""
    unknown = [name for name in names if name not in BUILTIN_NAMES]
    if unknown:
        raise ValueError(f"unknown built-in tool(s): {', '.join(unknown)}; choose from {', '.join(BUILTIN_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a built-in tool is named twice: {', '.join(names)}")
    return [_build(name, root, manager, vector_store_ids, python_limits or {}) for name in names]


def _build(name: str, root: Path | str | None, manager: Any, vector_store_ids: Sequence[str],
           python_limits: dict[str, Any]) -> FunctionTool:
    if name == "calculator":
        return function_tool(calculator)
    if name == "python":
        return python_tool(**python_limits)
    if name == "read_file":
        if root is None:
            raise ValueError("the read_file tool needs a root folder (the folder it may read)")
        return read_file_tool(root)
    if manager is None or not vector_store_ids:
        raise ValueError("the file_search tool needs a vector store manager and at least one vector store id")
    return file_search_tool(manager, vector_store_ids)
