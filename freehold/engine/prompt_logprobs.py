"""Prompt logprobs (SamplingParams.prompt_logprobs), read off the prefill that fills the KV cache.

The hidden state at prompt position p gives the next-token distribution after tokens 0..p, so it scores prompt
token p + 1:  logprob(prompt[p + 1]) = log_softmax(lm_head(hidden[p]))[prompt[p + 1]]  (freehold.sampling.logprobs,
the rule generated tokens use). The first prompt token has no context and no value (None). Each prefill chunk
yields the values of its own positions, and the LM head runs on at most ROWS_PER_PASS of them at a time, so the
extra memory is bounded by the chunk, not the prompt.

Only hidden states give these values and the prefix cache keeps KV alone, so a sequence that still needs them
takes no cache hit over those positions (vLLM skips the prefix cache for such requests; so does
`Scheduler._admit`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from freehold.engine.scheduler import ScheduledChunk
from freehold.engine.sequence import Sequence
from freehold.models.llama import LlamaForCausalLM
from freehold.quant.compute import RowKind, row_kinds
from freehold.sampling.logprobs import token_logprobs
from freehold.types import TokenLogprob

ROWS_PER_PASS = 256  # LM-head rows per pass: bounds the [rows, vocab] logits of a long chunk


@dataclass(frozen=True)
class PromptLogprobRows:
    """The flat-batch rows of one chunk whose hidden states score prompt tokens."""

    seq: Sequence
    first_row: int  # flat-batch row of the first scored position
    targets: list[int]  # the prompt tokens those rows score (position p's row scores token p + 1), in order


def select_rows(chunk: ScheduledChunk, chunk_row: int) -> PromptLogprobRows | None:
    """The rows of `chunk` (which starts at flat row `chunk_row`) that its sequence's prompt logprobs still need."""
    seq = chunk.seq
    needed = seq.next_prompt_logprob_position
    if needed is None:
        return None
    begin = max(needed, chunk.start)
    end = min(chunk.start + chunk.num_tokens, len(seq.prompt_token_ids) - 1)  # the last row scores no prompt token
    if begin >= end:
        return None
    assert begin == needed, f"positions {needed}..{begin} skipped"  # chunks come in order, hits stop at `needed`
    return PromptLogprobRows(seq, chunk_row + begin - chunk.start, seq.prompt_token_ids[begin + 1:end + 1])


def compute(model: LlamaForCausalLM, hidden: torch.Tensor,
            selected: list[PromptLogprobRows]) -> list[tuple[Sequence, list[TokenLogprob]]]:
    """hidden [T, E] of the flat batch -> each selection's sequence and the logprobs of its target tokens."""
    rows = torch.cat([torch.arange(s.first_row, s.first_row + len(s.targets)) for s in selected]).to(hidden.device)
    targets = torch.tensor([t for s in selected for t in s.targets], dtype=torch.int64, device=hidden.device)
    ks = [s.seq.params.prompt_logprobs for s in selected for _ in s.targets]
    values: list[TokenLogprob] = []
    with row_kinds(RowKind.DECODE):  # the LM head path of sampled rows: prompt and generated values agree
        for i in range(0, len(ks), ROWS_PER_PASS):
            part = slice(i, i + ROWS_PER_PASS)
            values += token_logprobs(model.compute_logits(hidden[rows[part]]), targets[part], ks[part])
    out, start = [], 0
    for s in selected:
        out.append((s.seq, values[start:start + len(s.targets)]))
        start += len(s.targets)
    return out
