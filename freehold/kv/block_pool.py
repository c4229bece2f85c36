"""The paged KV block pool: reference-counted fixed-size blocks with an automatic prefix cache.

A full block is identified by a chain digest d_i = SHA-256(d_{i-1}, extra, tokens of block i), so equal digests
mean equal prefixes (barring a SHA-256 collision). Blocks whose reference count drops to zero stay cached in an
LRU free queue and are only evicted (their digest forgotten) when the pool hands them out again.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

ROOT_DIGEST = bytes(32)  # d_{-1}: the parent of a sequence's first block


@dataclass(frozen=True)
class BlockKey:
    """Identity of a full block's KV: a SHA-256 digest of its parent's digest, `extra` and its token ids.

    Not Python's hash(): for ints and tuples it has no seed (PYTHONHASHSEED covers only str and bytes) and inverts
    easily, so two different prefixes could be crafted to share a key and be served each other's KV
    (tests/unit/test_block_pool.py builds such a pair for the former key hash((h_{i-1}, tokens_i))).
    """

    digest: bytes


def block_key(parent: BlockKey | None, tokens: Sequence[int], extra: bytes = b"") -> BlockKey:
    """d_i = SHA-256(d_{i-1} || len(extra) || extra || tokens_i as int64s), d_{-1} = 32 zero bytes.

    `extra` is for anything besides the token prefix that changes a block's KV. In this engine nothing does per
    request (the weights, dtypes and KV format are fixed per pool and positions follow from the chain), so every
    caller passes b"" today; a per-request input such as a LoRA adapter or a cache salt would go here.
    """
    parent_digest = parent.digest if parent is not None else ROOT_DIGEST
    data = struct.pack(f"<32sQ{len(extra)}s{len(tokens)}q", parent_digest, len(extra), extra, *tokens)
    return BlockKey(hashlib.sha256(data).digest())


class BlockPool:
    """Owns block ids 0..num_blocks-1. Mutated only by the engine thread."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.cached: dict[bytes, int] = {}  # chain digest -> block id
        self.num_queries = 0  # prefix-cache lookups, in tokens
        self.num_hits = 0  # tokens served from cache
        self.peak_in_use = 0  # the most blocks referenced at once (for memory reports: freehold.eval.streaming)

    # -- public API ---------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, evicting the least recently used cached ones."""
        if n > len(self.free_queue):
            raise RuntimeError(f"allocate({n}) with only {len(self.free_queue)} free blocks")
        blocks = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        self.peak_in_use = max(self.peak_in_use, self.num_blocks - len(self.free_queue))
        return blocks

    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Longest run of cached blocks matching `keys` from the start (no references taken)."""
        hits = []
        if not self.enable_prefix_caching:
            return hits
        for key in keys:
            block = self.cached.get(key.digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def acquire(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks (found by `lookup`)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
        self.peak_in_use = max(self.peak_in_use, self.num_blocks - len(self.free_queue))

    def register(self, block: int, key: BlockKey) -> None:
        """Mark a just-filled full block as holding `key`'s tokens so later requests can reuse it."""
        if not self.enable_prefix_caching or self.keys[block] is not None:
            return
        if key.digest in self.cached:  # an identical block is already cached; keep that one
            return
        self.keys[block] = key
        self.cached[key.digest] = block

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; the tail is freed first so it is evicted first."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_queries += num_query_tokens
        self.num_hits += num_hit_tokens

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that nobody references; returns how many were dropped."""
        dropped = [b for b in self.free_queue if self.keys[b] is not None]
        for block in dropped:
            self._forget(block)
        return len(dropped)

    def check_integrity(self, block_tables: Iterable[Sequence[int]]) -> None:
        """Every reference is accounted for by a live block table; free blocks are exactly the unreferenced ones;
        the cache maps each digest to a block holding that key. Raises AssertionError with the violation."""
        counts = [0] * self.num_blocks
        for table in block_tables:
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "reference counts differ from the live block tables"
        free = {b for b in range(self.num_blocks) if counts[b] == 0}
        assert set(self.free_queue) == free, "free queue differs from the unreferenced blocks"
        for digest, block in self.cached.items():
            key = self.keys[block]
            assert key is not None and key.digest == digest, f"cached {digest.hex()} maps to block {block} with {key}"
        assert sum(k is not None for k in self.keys) == len(self.cached), "a keyed block is missing from the cache"

    # -- private ------------------------------------------------------------------------------------------
    def _forget(self, block: int) -> None:
        key = self.keys[block]
        if key is not None:
            del self.cached[key.digest]
            self.keys[block] = None
