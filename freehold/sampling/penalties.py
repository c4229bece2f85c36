"""Logit penalties and masks: the stages that run before temperature, as pure tensor functions.

Every function takes the batch's logits [B, V] (fp32) and returns new logits [B, V]; none mutates its
input. Per-row parameters arrive as tensors [B] (or sparse (row, token) index lists), built once per step
by the sampler. A row whose parameter is neutral (penalty 1, presence 0, ...) comes out unchanged.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


def count_tokens(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """counts[b, t] = number of times token t occurs in token_ids[b]. Returns int32 [B, V] on device.
    Only the ids travel to the device; the [B, V] table is built there."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths).to(device)
    cols = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.long).to(device)
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.int32, device=device)
    return counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.int32), accumulate=True)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """l[r, t] += bias, for each (r, t, bias) triple (OpenAI `logit_bias`)."""
    return logits.index_put((rows, tokens), bias.to(logits.dtype), accumulate=True)


def mask_tokens(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """l[r, t] = -inf, for each (r, t) pair (used to hold back EOS / stop ids until min_tokens)."""
    return logits.index_put((rows, tokens), torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF / vLLM / CTRL rule, for tokens seen in prompt or output (seen: bool [B, V], penalty: [B]):
        l' = l / r  if l > 0
        l' = l * r  otherwise
    so r > 1 always makes a seen token less likely, whatever the sign of its logit."""
    r = penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / r, logits * r)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalties(logits: torch.Tensor, output_counts: torch.Tensor,
                                       presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI rule, over generated tokens only (output_counts: [B, V], presence / frequency: [B]):
        l' = l - frequency * c - presence * [c > 0]"""
    counts = output_counts.to(logits.dtype)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_allowed_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """l[b, t] = -inf where allowed[b, t] is False (constrained decoding)."""
    return logits.masked_fill(~allowed, NEG_INF)
