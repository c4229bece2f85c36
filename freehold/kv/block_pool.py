"""The paged KV block pool: reference-counted fixed-size blocks with an automatic prefix cache.

A full block is identified by the chain hash h_i = hash((h_{i-1}, tokens of block i)), so equal hashes mean equal
prefixes. Blocks whose reference count drops to zero stay cached in an LRU free queue and are only evicted
(their hash forgotten) when the pool hands them out again. Each cached block also stores its tokens and a hit
compares them, so a hash collision can never serve another prefix's KV.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class BlockKey:
    """Identity of a full block's content: its chain hash and its tokens (to rule out collisions)."""

    hash: int
    tokens: tuple[int, ...]


def block_key(parent: BlockKey | None, tokens: Sequence[int]) -> BlockKey:
    """h_i = hash((h_{i-1}, tokens_i)), with h_{-1} = 0."""
    tokens = tuple(tokens)
    return BlockKey(hash((parent.hash if parent is not None else 0, tokens)), tokens)


class BlockPool:
    """Owns block ids 0..num_blocks-1. Mutated only by the engine thread."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.num_queries = 0  # prefix-cache lookups, in tokens
        self.num_hits = 0  # tokens served from cache

    # -- public API ---------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

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
        return blocks

    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Longest run of cached blocks matching `keys` from the start (no references taken)."""
        hits = []
        if not self.enable_prefix_caching:
            return hits
        for key in keys:
            block = self.cached.get(key.hash)
            if block is None or self.keys[block] != key:
                break
            hits.append(block)
        return hits

    def acquire(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks (found by `lookup`)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1

    def register(self, block: int, key: BlockKey) -> None:
        """Mark a just-filled full block as holding `key`'s tokens so later requests can reuse it."""
        if not self.enable_prefix_caching or self.keys[block] is not None:
            return
        if key.hash in self.cached:  # an identical block is already cached; keep that one
            return
        self.keys[block] = key
        self.cached[key.hash] = block

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
        the cache maps each hash to a block holding that key. Raises AssertionError with the violation."""
        counts = [0] * self.num_blocks
        for table in block_tables:
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "reference counts differ from the live block tables"
        free = {b for b in range(self.num_blocks) if counts[b] == 0}
        assert set(self.free_queue) == free, "free queue differs from the unreferenced blocks"
        for h, block in self.cached.items():
            key = self.keys[block]
            assert key is not None and key.hash == h, f"cached hash {h} maps to block {block} with key {key}"
        assert sum(k is not None for k in self.keys) == len(self.cached), "a keyed block is missing from the cache"

    # -- private ------------------------------------------------------------------------------------------
    def _forget(self, block: int) -> None:
        key = self.keys[block]
        if key is not None:
            del self.cached[key.hash]
            self.keys[block] = None
