"""Rows of the vocabulary as C chunks of L tokens, and the exact two-level argmax over them.

A row of V entries is viewed (no copy) as [C, L] with V = C * L. A reduction over the chunks is one
vectorized pass over the row; the scalar work then runs on C + L entries instead of V:

    argmax:  the first chunk whose max is the row max holds the first occurrence of the row max, and the first
             max inside it is the answer: the same index as x.argmax (a scalar loop over V on CPU).
    draw:    chunk sums, then a cumulative sum inside one chunk (draw.py).
"""
from __future__ import annotations

import torch


def power_of_two_chunk(n: int) -> int:
    """The largest power of two <= sqrt(n) that divides n (1 when n is odd): a chunk length that splits a row
    of n entries into about sqrt(n) chunks of about sqrt(n), viewable without a copy."""
    length = 1
    while n % (2 * length) == 0 and (2 * length) ** 2 <= n:
        length *= 2
    return length


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for x [B, V] (the first index of each row's max), via the max of each chunk."""
    batch, vocab_size = x.shape
    length = power_of_two_chunk(vocab_size)
    if length == 1:
        return x.argmax(dim=-1)
    chunks = x.reshape(batch, vocab_size // length, length)
    best_chunk = chunks.amax(dim=-1).argmax(dim=-1)  # [B] the first chunk holding the row max
    inside = chunks[torch.arange(batch, device=x.device), best_chunk].argmax(dim=-1)  # [B] its first max
    return best_chunk * length + inside
