"""Inputs of any lengths -> buckets of similar length, each within a budget of tokens.

The encoder pads nothing (`freehold.embed.bert`), so the budget bounds a forward pass's activations (T tokens by
the MLP's width), and sorting (longest first) makes a bucket's inputs alike and the plan independent of the input
order. Every input takes the same path whatever else is in the call: buckets change which rows run together,
never how a row is computed.
"""
from __future__ import annotations

from typing import Sequence


def plan_buckets(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Input indices grouped into buckets, longest inputs first; each bucket holds at most `max_batch_tokens`
    tokens (a single input longer than the budget gets a bucket of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    used = 0
    for i in order:
        if buckets and used + lengths[i] <= max_batch_tokens:
            buckets[-1].append(i)
            used += lengths[i]
        else:
            buckets.append([i])
            used = lengths[i]
    return buckets
