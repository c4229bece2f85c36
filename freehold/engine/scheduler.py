"""Continuous batching with chunked prefill, admission by KV blocks and preemption by recompute.

Each step has a token budget (max_num_batched_tokens; speculative draft tokens ride on top of it, and get blocks only
where no preemption is needed, so speculation does not change the schedule of real tokens). Running sequences go first, oldest first, so decodes are
never starved by a long prompt; a prompt longer than the remaining budget is split into chunks across steps.
Waiting sequences are admitted FIFO while blocks, budget and max_num_seqs allow (no skipping ahead).
When a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later (its prefix is usually still cached).
A sequence that still needs prompt logprobs takes no cache hit over those positions (freehold.engine.prompt_logprobs).
A sink sequence (freehold.kv.sink) frees its oldest E window tokens when its window is full (W + E tokens) and
its chunks never cross such an eviction point (`SchedulerOutput.evictions`: the engine re-rotates the keys it
keeps); it takes cache hits on its sink blocks only. Preempted, it rebuilds its cache from its sinks and its window
tokens: the KV of those tokens seen afresh, no longer what the evicted tokens shaped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from freehold.engine.sequence import Sequence, SequenceStatus
from freehold.kv.block_pool import BlockPool


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int  # including the draft tokens
    num_drafts: int = 0  # speculative decoding: the chunk ends with the sequence's first num_drafts draft tokens

    @property
    def completes(self) -> bool:
        """After this chunk every token of the sequence has KV, so the step samples its next token."""
        return self.start + self.num_tokens - self.num_drafts == self.seq.num_tokens

    @property
    def num_sampled_rows(self) -> int:
        """Rows of the chunk that are sampled: its last real token's, and each draft's (verification)."""
        return 1 + self.num_drafts if self.samples else 0

    @property
    def samples(self) -> bool:
        """The chunk completes its sequence and the sequence draws a token (max_tokens 0: prefill only)."""
        return self.completes and self.seq.params.max_tokens > 0


class Eviction(NamedTuple):
    """A sink sequence freed `shift` tokens of its window: the keys it keeps in `blocks` move `shift` positions back."""

    blocks: tuple[int, ...]
    shift: int


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...]
    evictions: tuple[Eviction, ...] = ()  # to apply before the step's forward

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- public API ---------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget, chunks, preempted, evictions = self.max_num_batched_tokens, [], [], {}
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget, seq.max_chunk(seq.num_computed_tokens) or budget)
            if seq.sink is not None:
                evictions[seq] = self._evict(seq, n)
            if not self._grow_or_preempt(seq, n, preempted):
                continue
            k = self._fit_drafts(seq, n)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n + k, k))
            budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs and not preempted:
            chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break
            self.waiting.popleft()
            chunks.append(chunk)
            budget -= chunk.num_tokens
        kept = tuple(e for seq, e in evictions.items() if e is not None and seq.status is SequenceStatus.RUNNING)
        return SchedulerOutput(tuple(chunks), tuple(preempted), kept)  # a preempted sequence's blocks are not its own

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks, keeping full blocks cached for reuse."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED

    def block_tables(self) -> list[list[int]]:
        return [s.block_table for s in self.running] + [s.block_table for s in self.waiting]

    # -- private ------------------------------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, num_new: int) -> int:
        total = -(-(seq.cache_len + num_new) // self.pool.block_size)
        return max(0, total - len(seq.block_table))

    def _grow_or_preempt(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Give `seq` blocks for n more tokens, preempting the newest running sequences if needed."""
        need = self._blocks_needed(seq, n)
        while not self.pool.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.block_table += self.pool.allocate(need)
        return True

    def _evict(self, seq: Sequence, n: int) -> Eviction | None:
        """Free the sink sequence's oldest E window tokens if its window is full (n is at most its max_chunk)."""
        assert seq.sink is not None
        k = seq.sink.num_blocks_to_evict(seq.cache_len, n)
        if k == 0:
            return None
        first = seq.sink.num_sink_blocks
        self.pool.free(seq.block_table[first:first + k])
        del seq.block_table[first:first + k]
        seq.num_evicted_tokens += k * self.pool.block_size
        computed = -(-seq.cache_len // self.pool.block_size)  # blocks holding KV (not the ones for this chunk)
        return Eviction(tuple(seq.block_table[first:computed]), k * self.pool.block_size)

    def _fit_drafts(self, seq: Sequence, n: int) -> int:
        """Keep the sequence's drafts that get KV blocks without preempting anyone; outside the token budget, so
        that speculation changes neither how prompts are split into chunks nor who is preempted."""
        k = len(seq.draft_token_ids) if n == seq.num_uncomputed else 0
        while k and not self.pool.can_allocate(self._blocks_needed(seq, n + k)):
            k -= 1
        del seq.draft_token_ids[k:]
        seq.block_table += self.pool.allocate(self._blocks_needed(seq, n + k))
        return k

    def release_unused_blocks(self, seq: Sequence) -> None:
        """Free the blocks past the sequence's computed tokens (rejected drafts' KV): never registered, so they
        go back to the pool as fresh blocks. The next step allocates what it needs again."""
        keep = -(-seq.num_computed_tokens // self.pool.block_size)
        if len(seq.block_table) > keep:
            self.pool.free(seq.block_table[keep:])
            del seq.block_table[keep:]

    def _preempt(self, seq: Sequence) -> None:
        seq.draft_token_ids.clear()
        self.running.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        """Reuse cached prefix blocks, then allocate blocks for the first chunk; None if it does not fit."""
        if seq.waits_for_parent and self.pool.enable_prefix_caching:
            return None
        bs = self.pool.block_size
        seq.update_block_keys(bs)
        max_hit_blocks = (seq.num_tokens - 1) // bs  # always compute at least the last token
        if seq.sink is not None:  # window blocks are rotated in place: never shared
            max_hit_blocks = min(max_hit_blocks, seq.sink.num_sink_blocks)
        needed = seq.next_prompt_logprob_position
        if needed is not None:  # prompt logprobs need hidden states, which the cache does not keep (vLLM skips the
            max_hit_blocks = min(max_hit_blocks, needed // bs)  # prefix cache for such requests; so do we)
        hits = self.pool.lookup(seq.block_keys[:max_hit_blocks])
        num_cached = len(hits) * bs
        start = seq.resume_point(num_cached)
        n = min(seq.num_tokens - start, budget, seq.max_chunk(start) or budget)
        need = -(-(num_cached + n) // bs) - len(hits)
        # blocks found in the free queue (cached, unreferenced) are not available for allocation
        reused_free = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if not self.pool.can_allocate(need + reused_free):
            return None
        self.pool.acquire(hits)
        seq.block_table = hits + self.pool.allocate(need)
        seq.num_computed_tokens = start
        if not seq.admitted_once:
            seq.num_cached_tokens = num_cached
            seq.admitted_once = True
            self.pool.record_lookup(len(seq.prompt_token_ids), num_cached)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledChunk(seq, start, n)
