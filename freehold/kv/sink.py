"""Attention sinks + a sliding window (StreamingLLM, Xiao et al. 2023): the KV policy "sink".

A sink sequence keeps the KV of its first `num_sink_blocks` blocks (the sinks: softmax parks attention mass on
the first tokens, so they stay) and of its most recent tokens (the window). The window holds between W and W + E
tokens (W = the window in whole blocks, E = the eviction step: W/8 rounded down to whole blocks, at least one
block). When the next token would take it past W + E, the oldest E window tokens (E/block_size blocks) are freed
first; chunks never cross such an eviction point (`max_chunk`), so which tokens a token attends to depends on its
index only, never on how a prompt is split into chunks, on the batch or on a sibling: every token sees the sinks
and the window as decoding it alone would (the tests compare with a token-by-token StreamingLLM). A sequence holds
at most sinks + (W + E)/block_size blocks however long it runs. Evicted tokens are gone: later tokens cannot
attend to them.

Sinks are whole blocks because the attention kernels read a sequence as a block table plus a length (the kept
slots must be a prefix of the table): sink_tokens=4 with 16-token blocks keeps the first 16 tokens.

Positions live in the cache, as in StreamingLLM: a kept token's RoPE position is its index in the cache (sinks
0..S-1, then the window consecutively) and each query sits at its own cache index. Keys are stored rotated, so when
E tokens are evicted every kept window key's position drops by E and the key is rotated once more:
    RoPE(x, p - E) = R(-E) RoPE(x, p),   R(a): each pair (x_i, x_{i+D/2}) rotated by the angle a * theta_i
computed in fp32 and stored back in the cache's element type: a bf16 cache rounds again, an int8 cache requantizes,
once per eviction the key survives, at most W/E (= 8 for W >= 8 blocks) times (docs/architecture.md gives the
resulting key error). The sink blocks are never rotated, so they hold what any sequence with the same first tokens
computes and may be shared through the prefix cache; window blocks are never registered there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from freehold.errors import InvalidRequestError
from freehold.layers.attention import KVCache
from freehold.layers.rotary import RotaryEmbedding


EVICT_FRACTION = 8  # the eviction step E is the window / EVICT_FRACTION, in whole blocks (at least one)


@dataclass(frozen=True)
class SinkWindow:
    """The sink + window shape of one engine, in blocks."""

    block_size: int
    num_sink_blocks: int
    num_window_blocks: int
    num_evict_blocks: int  # E / block_size: window blocks freed at once

    @classmethod
    def from_tokens(cls, sink_tokens: int, window: int, block_size: int) -> SinkWindow:
        """Sinks and window rounded up to whole blocks (a window under one block is an error); the eviction step
        is window / EVICT_FRACTION rounded down to whole blocks, at least one block."""
        if window < block_size:
            raise InvalidRequestError(f"window must hold at least one block of {block_size} tokens, got {window}",
                                      param="window")
        num_window_blocks = -(-window // block_size)
        return cls(block_size, -(-sink_tokens // block_size), num_window_blocks,
                   max(1, num_window_blocks // EVICT_FRACTION))

    @property
    def num_sink_tokens(self) -> int:
        return self.num_sink_blocks * self.block_size

    @property
    def window_tokens(self) -> int:
        return self.num_window_blocks * self.block_size

    @property
    def evict_tokens(self) -> int:
        """E: the tokens one eviction frees (whole blocks)."""
        return self.num_evict_blocks * self.block_size

    @property
    def max_blocks(self) -> int:
        """The most blocks a sink sequence holds: sinks and a full window of W + E tokens."""
        return self.num_sink_blocks + self.num_window_blocks + self.num_evict_blocks

    @property
    def max_cache_len(self) -> int:
        """The most tokens a sink sequence has in the cache (the largest RoPE position is one less)."""
        return self.max_blocks * self.block_size

    def room(self, cache_len: int) -> int:
        """Tokens that may join a cache of `cache_len` tokens before the next eviction (0: evict first)."""
        return self.max_cache_len - cache_len

    def max_chunk(self, cache_len: int) -> int:
        """The most tokens one chunk may bring into a cache of `cache_len` tokens: up to the next eviction point,
        or E right after an eviction (`num_blocks_to_evict`), so that a chunk never crosses an eviction point."""
        return self.room(cache_len) or self.evict_tokens

    def num_blocks_to_evict(self, cache_len: int, num_new: int) -> int:
        """Oldest window blocks to free before `num_new` tokens (at most `max_chunk(cache_len)`) join a cache of
        `cache_len` tokens: E/block_size when the window is full (W + E tokens), else none."""
        if num_new > self.max_chunk(cache_len):
            raise ValueError(f"a chunk of {num_new} tokens crosses an eviction point (at most "
                             f"{self.max_chunk(cache_len)} after {cache_len} cached tokens)")
        return self.num_evict_blocks if self.room(cache_len) == 0 else 0


def shift_keys(cache: KVCache, rope: RotaryEmbedding, blocks: list[int], shift: int) -> None:
    """Move the keys stored in `blocks` (every layer) `shift` positions back: k <- R(-shift) k, in fp32 and in
    place, one layer at a time (KVCache.transform_keys)."""
    if not blocks or shift == 0:
        return
    cos, sin = rope.cos[shift].float(), rope.sin[shift].float()  # [D/2]: angles shift * theta_i
    neg_sin = -sin
    half = cos.shape[0]

    def rotate(k: torch.Tensor) -> None:  # R(-a): x1' = x1 cos a + x2 sin a,  x2' = x2 cos a - x1 sin a
        x1, x2 = k[..., :half], k[..., half:]
        x1_old = x1.clone()
        x1.mul_(cos).addcmul_(x2, sin)
        x2.mul_(cos).addcmul_(x1_old, neg_sin)

    cache.transform_keys(torch.tensor(blocks, dtype=torch.int64, device=cache.k.device), rotate)
