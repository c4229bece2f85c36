"""Chunking a document by the embedder's tokens, with overlap (OpenAI's vector-store `chunking_strategy`).

Chunks end on whitespace, so each chunk is a slice of the original text (case, punctuation and line breaks kept):
the text is split into whitespace-separated words, each word is counted in embedder tokens (BERT's pre-tokenizer
splits on whitespace first, so a text's tokens are its words' tokens side by side), and words are packed greedily
into chunks of at most `max_chunk_size_tokens`. The next chunk starts at the earliest word such that the words
it repeats from the previous chunk hold at most `chunk_overlap_tokens` tokens. A single word longer than a whole
chunk (a URL, a base64 blob) is cut by token windows and decoded.

The embedder reads at most `max_seq_length` tokens (256 for all-MiniLM-L6-v2): a chunk longer than that (OpenAI's
default is 800) is embedded from its first `max_seq_length` tokens only, while BM25 indexes the whole chunk. Pick
`max_chunk_size_tokens` <= the embedder's `max_seq_length` for dense retrieval to see every word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from freehold.errors import InvalidRequestError

DEFAULT_MAX_TOKENS = 800  # OpenAI's "auto" strategy
DEFAULT_OVERLAP_TOKENS = 400
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 100, 4096  # OpenAI's bounds on max_chunk_size_tokens

_WORD = re.compile(r"\S+")


class TokenCodec(Protocol):
    """What chunking needs from an embedder (freehold.embed.Embedder has it)."""

    def encode_tokens(self, text: str) -> list[int]: ...

    def decode_tokens(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class ChunkingStrategy:
    max_chunk_size_tokens: int = DEFAULT_MAX_TOKENS
    chunk_overlap_tokens: int = DEFAULT_OVERLAP_TOKENS

    def __post_init__(self):
        if not MIN_MAX_TOKENS <= self.max_chunk_size_tokens <= MAX_MAX_TOKENS:
            raise InvalidRequestError(
                f"chunking_strategy.static.max_chunk_size_tokens must be between {MIN_MAX_TOKENS} and "
                f"{MAX_MAX_TOKENS}, got {self.max_chunk_size_tokens}", param="chunking_strategy")
        if not 0 <= self.chunk_overlap_tokens <= self.max_chunk_size_tokens // 2:
            raise InvalidRequestError(
                f"chunking_strategy.static.chunk_overlap_tokens must be between 0 and half of max_chunk_size_tokens "
                f"({self.max_chunk_size_tokens // 2}), got {self.chunk_overlap_tokens}", param="chunking_strategy")

    @classmethod
    def from_request(cls, obj: dict[str, Any] | None) -> ChunkingStrategy:
        """OpenAI's shape: None or {"type": "auto"} -> 800/400; {"type": "static", "static": {...}}."""
        if obj is None or obj.get("type") == "auto":
            return cls()
        if obj.get("type") != "static":
            raise InvalidRequestError(f"chunking_strategy.type must be 'auto' or 'static', got {obj.get('type')!r}",
                                      param="chunking_strategy")
        static = obj.get("static")
        if not isinstance(static, dict):
            raise InvalidRequestError("chunking_strategy.static must be an object", param="chunking_strategy")
        fields = ("max_chunk_size_tokens", "chunk_overlap_tokens")
        for name in fields:
            if not isinstance(static.get(name), int) or isinstance(static.get(name), bool):
                raise InvalidRequestError(f"chunking_strategy.static.{name} must be an integer",
                                          param="chunking_strategy")
        return cls(static["max_chunk_size_tokens"], static["chunk_overlap_tokens"])

    def to_request(self) -> dict[str, Any]:
        return {"type": "static", "static": {"max_chunk_size_tokens": self.max_chunk_size_tokens,
                                             "chunk_overlap_tokens": self.chunk_overlap_tokens}}


@dataclass(frozen=True)
class Chunk:
    text: str
    num_tokens: int  # embedder tokens, special tokens not counted


def chunk_text(text: str, codec: TokenCodec, strategy: ChunkingStrategy = ChunkingStrategy()) -> list[Chunk]:
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    counts = _count_words([text[s:e] for s, e in words], codec)
    chunks: list[Chunk] = []
    start = 0
    while start < len(words):
        end, total = _pack(counts, start, strategy.max_chunk_size_tokens)
        if end == start:  # one word longer than a chunk: cut it by tokens
            chunks += _split_word(text[words[start][0]:words[start][1]], codec, strategy)
            start += 1
            continue
        chunks.append(Chunk(text[words[start][0]:words[end - 1][1]], total))
        if end == len(words):
            break
        start = _overlap_start(counts, start, end, strategy.chunk_overlap_tokens)
    return chunks


def _count_words(words: list[str], codec: TokenCodec) -> list[int]:
    cache: dict[str, int] = {}
    for w in words:
        if w not in cache:
            cache[w] = len(codec.encode_tokens(w))
    return [cache[w] for w in words]


def _pack(counts: list[int], start: int, limit: int) -> tuple[int, int]:
    """Largest end such that counts[start:end] sums to at most limit; returns (end, that sum)."""
    end, total = start, 0
    while end < len(counts) and total + counts[end] <= limit:
        total += counts[end]
        end += 1
    return end, total


def _overlap_start(counts: list[int], start: int, end: int, overlap: int) -> int:
    """The earliest word > start whose run up to `end` holds at most `overlap` tokens (always > start: progress)."""
    s, total = end, 0
    while s - 1 > start and total + counts[s - 1] <= overlap:
        total += counts[s - 1]
        s -= 1
    return s


def _split_word(word: str, codec: TokenCodec, strategy: ChunkingStrategy) -> list[Chunk]:
    ids = codec.encode_tokens(word)
    size, step = strategy.max_chunk_size_tokens, strategy.max_chunk_size_tokens - strategy.chunk_overlap_tokens
    starts = range(0, max(len(ids) - strategy.chunk_overlap_tokens, 1), step)
    return [Chunk(codec.decode_tokens(ids[i:i + size]), len(ids[i:i + size])) for i in starts]
