"""Streaming detokenization: turn generated ids into text as they arrive, never emitting half a character.

Technique (vLLM's prefix/read offsets): decode a short window of already-emitted tokens (from `prefix_offset`)
plus the new ones, and emit only what extends the window's old text (the tokens up to `read_offset`). Decoding
a window, not single tokens, keeps byte-level/sentencepiece leading spaces right; holding back text that ends
in U+FFFD keeps an incomplete UTF-8 sequence (an emoji split over byte tokens) until its last byte arrives.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from freehold.tokenizer.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Concatenating every `push` and the final `flush` gives `tokenizer.decode(all_ids)`, for any split."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this have been emitted

    @property
    def token_ids(self) -> list[int]:
        return list(self._token_ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete (possibly empty)."""
        self._token_ids.extend(token_ids)
        prefix_text, window_text = self._decode_window()
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or the last character is still incomplete
        self._advance()
        return window_text[len(prefix_text):]

    def flush(self) -> str:
        """The text still held back (e.g. a trailing invalid byte sequence, decoded as U+FFFD)."""
        prefix_text, window_text = self._decode_window()
        self._advance()
        return window_text[len(prefix_text):]

    def _decode_window(self) -> tuple[str, str]:
        window = self._token_ids[self._prefix_offset:]
        num_read = self._read_offset - self._prefix_offset
        return self._decode(window[:num_read]), self._decode(window)

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens) if token_ids else ""
