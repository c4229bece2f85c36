"""A fast reader for the key/value metadata at the start of a GGUF file (format v2/v3).

`gguf.GGUFReader` also parses every tensor header into numpy memmaps, which takes seconds for a vocabulary of
50k tokens; this reads only the metadata, with `struct`, in well under a second.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from freehold.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads little- or big-endian GGUF values from a buffer, front to back."""

    def __init__(self, buffer: memoryview, byte_order: str):
        self.buffer = buffer
        self.byte_order = byte_order
        self.offset = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(self.byte_order + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        start, self.offset = self.offset, self.offset + length
        if self.offset > len(self.buffer):
            raise struct.error(f"a string of {length} bytes runs past the end of the file")
        return bytes(self.buffer[start:self.offset]).decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        return self.scalar(_SCALARS[value_type])

    def array(self) -> list[Any]:
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type in _SCALARS and item_type != 7:  # numbers: unpack all at once
            fmt = f"{self.byte_order}{count}{_SCALARS[item_type]}"
            values = list(struct.unpack_from(fmt, self.buffer, self.offset))
            self.offset += struct.calcsize(fmt)
            return values
        return [self.value(item_type) for _ in range(count)]


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (arrays as lists). Raises ModelLoadError."""
    path = Path(path)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as buffer:
                return _parse(buffer, path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read GGUF metadata from {path}: {e}") from e


def _parse(buffer: memoryview, path: Path) -> dict[str, Any]:
    if bytes(buffer[:4]) != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic bytes {bytes(buffer[:4])!r})")
    byte_order = "<" if struct.unpack_from("<I", buffer, 4)[0] < 0x10000 else ">"
    cursor = _Cursor(buffer, byte_order)
    cursor.offset = 4
    version = cursor.scalar("I")
    if version not in (2, 3):
        raise ModelLoadError(f"{path} is GGUF version {version}; Freehold reads versions 2 and 3")
    cursor.scalar("Q")  # tensor count
    num_kv = cursor.scalar("Q")
    metadata = {}
    try:
        for _ in range(num_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("I"))
    except (struct.error, KeyError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} has malformed GGUF metadata after {len(metadata)} keys: {e!r}") from e
    return metadata
