"""A sequence: one completion being generated (a request with n > 1 owns n sequences)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from freehold.constrain.matcher import GrammarState
from freehold.kv.block_pool import BlockKey, block_key
from freehold.kv.sink import SinkWindow
from freehold.spec.policy import SpecState
from freehold.types import FinishReason, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # FIFO order
    generator: torch.Generator | None = None
    parent: Sequence | None = None  # completion 0 of the same request: siblings wait for its prompt KV, then share it
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache at first admission
    num_preemptions: int = 0
    admitted_once: bool = False
    block_table: list[int] = field(default_factory=list)
    block_keys: list[BlockKey] = field(default_factory=list)  # keys of the full blocks of prompt + output
    num_emitted: int = 0  # output tokens already reported to the caller
    grammar: GrammarState | None = None  # structured output: follows output_token_ids, one token per step
    # SamplingParams.prompt_logprobs (completion 0 only): entry i scores prompt token i, [None] before the prefill;
    # filled chunk by chunk from the prefill's own hidden states, reported once when complete
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_reported: bool = False
    # speculative decoding: this step's draft tokens (after the last real token; never part of the sequence's tokens
    # until verified) and the sequence's proposer state (None when the engine does not speculate)
    draft_token_ids: list[int] = field(default_factory=list)
    spec: SpecState | None = None
    # kv_policy "sink" (freehold.kv.sink): the sink + window shape, and the tokens after the sinks whose KV was freed
    # (tokens [num_sink_tokens, num_sink_tokens + num_evicted_tokens) are gone from the cache for good)
    sink: SinkWindow | None = None
    num_evicted_tokens: int = 0

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence (called every step)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def cache_len(self) -> int:
        """Tokens whose KV is in the sequence's cache (a sink sequence's evicted tokens are not)."""
        return self.num_computed_tokens - self.num_evicted_tokens

    def cache_index(self, token: int) -> int:
        """Where token `token` (not an evicted one) sits in the sequence's cache: its slot and its RoPE position."""
        if self.sink is not None and token >= self.sink.num_sink_tokens:
            return token - self.num_evicted_tokens
        return token

    def resume_point(self, num_computed: int) -> int:
        """The next token to compute once tokens [0, num_computed) are computed: a sink sequence that rebuilds its
        cache (after preemption) goes from its last sink token on to its window, over the tokens it evicted."""
        if self.sink is not None and self.num_evicted_tokens and num_computed == self.sink.num_sink_tokens:
            return num_computed + self.num_evicted_tokens
        return num_computed

    def max_chunk(self, start: int) -> int | None:
        """The most tokens one chunk from token `start` may hold (None: no limit): a sink sequence's chunk never
        crosses an eviction point (SinkWindow.max_chunk), and stops at the sinks when evicted tokens follow them."""
        if self.sink is None:
            return None
        if self.num_evicted_tokens and start < self.sink.num_sink_tokens:
            return self.sink.num_sink_tokens - start
        return self.sink.max_chunk(self.cache_index(start))

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def waits_for_parent(self) -> bool:
        """A sibling starts once the parent's prompt blocks are computed, so it reuses them from the prefix cache."""
        p = self.parent
        return p is not None and not p.finished and p.num_computed_tokens < len(p.prompt_token_ids)

    @property
    def next_prompt_logprob_position(self) -> int | None:
        """The first prompt position whose hidden state prompt logprobs still need (position p's row scores token
        p + 1); None when none are needed. A preempted sequence resumes here instead of recomputing values."""
        if self.prompt_logprobs is None or len(self.prompt_logprobs) >= len(self.prompt_token_ids):
            return None
        return len(self.prompt_logprobs) - 1

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def update_block_keys(self, block_size: int) -> None:
        """Extend `block_keys` to cover every full block of the sequence's tokens."""
        while (len(self.block_keys) + 1) * block_size <= self.num_tokens:
            i = len(self.block_keys)
            parent = self.block_keys[-1] if self.block_keys else None
            self.block_keys.append(block_key(parent, self.token_ids(i * block_size, (i + 1) * block_size)))
