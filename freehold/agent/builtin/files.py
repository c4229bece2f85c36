"""The `read_file` tool: read a UTF-8 text file under one root folder, a page of characters at a time.

Paths are taken relative to the root; `..`, absolute paths and symlinks that lead outside it are refused (the
resolved path must lie under the resolved root).
"""
from __future__ import annotations

from pathlib import Path

from freehold.agent.functions import FunctionTool, function_tool

MAX_FILE_BYTES = 64 * 2**20  # read_file loads the whole file to page by characters: a bound on that


def read_file_tool(root: str | Path, max_chars: int = 20000) -> FunctionTool:
    """The tool over `root` (which must be a folder); each call returns at most `max_chars` characters."""
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise ValueError(f"read_file: the root {str(root)!r} is not a folder")
    if max_chars < 1:
        raise ValueError(f"read_file: max_chars must be at least 1, got {max_chars}")

    def read_file(path: str, offset: int = 0) -> str:
        """Read a text file from the workspace. Long files come in pages: the result says which offset to ask for next.

        Args:
            path: the file's path relative to the workspace folder, e.g. "docs/notes.md".
            offset: the character to start from (0 for the beginning).
        """
        text = _read_text(resolve_inside(base, path), path)
        if offset < 0 or (offset > len(text) and text):
            raise ValueError(f"offset {offset} is outside the file {path!r}, which has {len(text)} characters")
        page = text[offset:offset + max_chars]
        end = offset + len(page)
        if end < len(text):
            return f"{page}\n[characters {offset}-{end} of {len(text)}; call read_file with offset={end} for more]"
        return page
    return function_tool(read_file)


def resolve_inside(base: Path, path: str) -> Path:
    """`base / path` with symlinks resolved; ValueError when that leaves `base`."""
    if not path or "\x00" in path:
        raise ValueError("the path is empty or holds a NUL character")
    target = (base / path).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{path!r} is outside the workspace folder: give a path relative to it")
    return target


def _read_text(target: Path, path: str) -> str:
    if not target.exists():
        raise FileNotFoundError(f"no file {path!r} in the workspace folder")
    if target.is_dir():
        raise IsADirectoryError(f"{path!r} is a folder, not a file")
    if target.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path!r} is larger than {MAX_FILE_BYTES // 2**20} MB")
    data = target.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path!r} is not a UTF-8 text file (a binary file?)") from None
