"""The typed values a vector store takes and returns (what an HTTP layer maps to OpenAI's JSON)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from freehold.errors import InvalidRequestError, NotFoundError
from freehold.retrieval.chunking import ChunkingStrategy
from freehold.retrieval.filters import AttributeValue

MAX_ATTRIBUTES, MAX_KEY_CHARS, MAX_VALUE_CHARS = 16, 64, 512  # OpenAI's limits on file attributes


class StoreNotFoundError(NotFoundError):
    """A vector store (or a file in it) that does not exist: HTTP 404."""


class FileStatus(str, enum.Enum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class SearchMode(str, enum.Enum):
    BM25 = "bm25"
    DENSE = "dense"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class FileInput:
    file_id: str
    filename: str
    text: str
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    chunking: ChunkingStrategy = ChunkingStrategy()

    def __post_init__(self):
        if not isinstance(self.file_id, str) or not self.file_id:
            raise InvalidRequestError("file_id must be a non-empty string", param="file_id")
        check_attributes(self.attributes)


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    filename: str
    status: FileStatus
    error: str | None
    attributes: dict[str, AttributeValue]
    num_chunks: int
    created_at: int
    chunking: ChunkingStrategy


@dataclass(frozen=True)
class FileCounts:
    in_progress: int = 0
    completed: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.in_progress + self.completed + self.failed


@dataclass(frozen=True)
class StoreInfo:
    id: str
    name: str | None
    created_at: int
    file_counts: FileCounts
    usage_bytes: int  # chunk text (UTF-8) plus float32 vectors
    embedder: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchHit:
    file_id: str
    filename: str
    chunk_id: int
    text: str
    score: float  # bm25: BM25 score; dense: cosine similarity; hybrid: normalized RRF in (0, 1]
    attributes: dict[str, AttributeValue]


@dataclass(frozen=True)
class SearchResult:
    hits: list[SearchHit]
    mode: SearchMode
    incomplete: bool  # some files were still being ingested: only completed files were searched


def check_attributes(attributes: Any) -> None:
    if not isinstance(attributes, dict):
        raise InvalidRequestError("attributes must be an object", param="attributes")
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidRequestError(f"attributes may hold at most {MAX_ATTRIBUTES} keys", param="attributes")
    for key, value in attributes.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
            raise InvalidRequestError(f"attribute keys must be strings of 1 to {MAX_KEY_CHARS} characters: {key!r}",
                                      param="attributes")
        if not isinstance(value, (str, int, float, bool)) or (isinstance(value, str) and len(value) > MAX_VALUE_CHARS):
            raise InvalidRequestError(f"attributes.{key} must be a boolean, a number or a string of at most "
                                      f"{MAX_VALUE_CHARS} characters", param="attributes")
