"""Prompt lookup (n-gram) proposals: when the last n tokens of a sequence occurred before in its prompt or output,
propose the tokens that followed that occurrence. No model, no memory beyond one index per sequence: extractive
work (quoting, summarising, editing code, answering from retrieved text) repeats long runs of its context.

    sequence  ... a b c d e ... x a b c
                      ^ the last earlier occurrence of the suffix "a b c"  ->  propose "d e ..."

The longest suffix wins (n from MAX_N down to MIN_N), then its most recent occurrence. The index maps each n-gram to
the last position where it starts and has a following token; it grows by one entry per n per appended token.
"""
from __future__ import annotations

from typing import Callable

MIN_N, MAX_N = 2, 4  # a single repeated token predicts little; 4 tokens of context is plenty


class NgramIndex:
    def __init__(self) -> None:
        self._last_start: dict[tuple[int, ...], int] = {}  # n-gram -> last start position with a follower
        self._num_indexed = 0  # tokens [0, _num_indexed) have had their n-grams ending before them indexed

    def propose(self, token_ids: Callable[[int, int], list[int]], length: int, k: int) -> list[int]:
        """Up to k draft tokens to follow a sequence of `length` tokens (`token_ids(start, end)` reads them; the
        sequence only ever grows)."""
        self._extend(token_ids, length)
        if k < 1 or length < MIN_N + 1:
            return []
        tail = token_ids(max(0, length - MAX_N), length)
        for n in range(min(MAX_N, length - 1), MIN_N - 1, -1):
            start = self._last_start.get(tuple(tail[len(tail) - n:]))
            if start is not None:
                follow = start + n
                return token_ids(follow, min(follow + k, length))
        return []

    def _extend(self, token_ids: Callable[[int, int], list[int]], length: int) -> None:
        """Index the n-grams that end just before each token not yet indexed (that token is their follower)."""
        first = max(self._num_indexed, 1)
        if first >= length:
            return
        offset = max(0, first - MAX_N)
        tokens = token_ids(offset, length)
        for follower in range(first, length):
            for n in range(MIN_N, min(MAX_N, follower) + 1):
                self._last_start[tuple(tokens[follower - n - offset:follower - offset])] = follower - n
        self._num_indexed = length
