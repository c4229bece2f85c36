"""Perplexity over a text: non-overlapping windows, each scored on its own (no context carried across).
With a KV cache, each window runs as one prefill through it, so attention sees K/V as the cache stores them
(bf16- or int8-rounded): the way to measure what a quantized KV cache costs in accuracy.

ppl = exp( sum of -log p(x_t | x_<t within the window) / number of predicted tokens )
A window of W tokens predicts W - 1 of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from freehold.errors import InvalidRequestError
from freehold.layers.attention import AttentionMetadata, KVCache, PrefillChunk
from freehold.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    num_tokens: int  # tokens evaluated (windows x window size)
    num_predicted: int
    num_windows: int


def default_text() -> str:
    """The pydoc topics text, joined in sorted key order (ships with CPython)."""
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))


@torch.inference_mode()
def window_nll(model: LlamaForCausalLM, ids: torch.Tensor, cache: KVCache | None = None) -> float:
    """Summed negative log-likelihood of ids[1:] given the preceding ids of the same window; with a cache, the
    window is one fresh sequence in its first blocks."""
    positions = torch.arange(len(ids), device=ids.device)
    meta = None
    if cache is not None:
        table = torch.arange(-(-len(ids) // cache.block_size), device=ids.device)
        meta = AttentionMetadata(positions, 0, None, None, (PrefillChunk(0, len(ids), len(ids), table),))
    hidden = model(ids, positions, cache, meta)
    logits = model.compute_logits(hidden[:-1])
    return float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))


def perplexity(model: LlamaForCausalLM, token_ids: list[int], window: int = 1024,
               max_tokens: int | None = 32768, progress=None, cache: KVCache | None = None) -> PerplexityResult:
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    num_windows = len(ids) // window
    if num_windows == 0:
        raise InvalidRequestError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    total = 0.0
    for w in range(num_windows):
        total += window_nll(model, torch.tensor(ids[w * window:(w + 1) * window], device=device), cache)
        if progress is not None:
            progress(w + 1, num_windows)
    predicted = num_windows * (window - 1)
    return PerplexityResult(math.exp(total / predicted), num_windows * window, predicted, num_windows)
