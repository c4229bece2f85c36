"""Token logprobs from raw logits: the one rule for generated tokens (the sampler) and prompt tokens (the runner).

    logprob(t | row) = log_softmax(logits[row])[t]        rank(t) = 1 + #{u : logprob(u) > logprob(t)}

on the RAW model logits (before penalties, masks or temperature), as OpenAI and vLLM report them. A request may also
ask for the processed ones (`SamplingParams.processed_logprobs`, vLLM's `processed_logprobs` mode, per request):

    processed_logprob(t | row) = log p[t],   p = transform_probs(l, temperature, top_k, top_p, min_p)

where l are the logits after logit_bias, min_tokens, penalties and masks: the distribution the token was drawn from.
Without top-p (the usual case) p is computed without transform_probs' full sort of the vocabulary: top-k by its k-th
largest logit (`topk`), min-p and the softmax as there, so p is the same tensor; top-p < 1 takes the sort.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from freehold.sampling.transforms import (NEG_INF, apply_min_p, apply_temperature, is_greedy_temperature,
                                          transform_probs)
from freehold.types import ProcessedLogprobs, SamplingParams, TokenLogprob


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int]) -> list[TokenLogprob]:
    """logits [R, V] (raw, any float dtype), token_ids [R] -> per row the token's logprob, its rank and the top-ks[r]
    alternatives, most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [R, 1]
    ranks = (logprobs > chosen).sum(dim=-1).add_(1).tolist()
    top_values, top_ids = (v.tolist() for v in logprobs.topk(max(ks, default=0), dim=-1))
    return [TokenLogprob(token_id=t, logprob=lp, top=tuple(zip(top_ids[r][:k], top_values[r][:k])), rank=rank)
            for r, (t, lp, k, rank) in enumerate(zip(token_ids.tolist(), chosen.squeeze(1).tolist(), ks, ranks))]


def processed_logprobs(logits: torch.Tensor, token_id: int, params: SamplingParams, k: int) -> ProcessedLogprobs:
    """logits [V] after stages 1-5 of the sampler -> the chosen token's log p and the top-k tokens with p > 0, where
    p is the distribution the sampler draws from under `params` (one-hot at the argmax for greedy rows)."""
    logprobs = sampling_probs(logits, params).log()
    values, ids = logprobs.topk(min(k, logprobs.numel()))
    top = tuple((t, v) for t, v in zip(ids.tolist(), values.tolist()) if v != float("-inf"))
    return ProcessedLogprobs(float(logprobs[token_id]), top)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`transform_probs(logits, T, top_k, top_p, min_p)` [V], without its sort of the whole vocabulary when top-p is
    off. The same steps on the same values: l / T; drop l < the k-th largest (ties kept), which is what the sort's
    threshold keeps; top-p = 1 drops nothing that has p > 0; min-p; softmax."""
    if params.top_p < 1.0 or is_greedy_temperature(params.temperature):
        return transform_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    scaled = apply_temperature(logits.float().unsqueeze(0), params.temperature)  # [1, V]
    if params.top_k is not None and params.top_k < scaled.shape[1]:
        kth_largest = scaled.topk(params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, NEG_INF)
    return apply_min_p(scaled, params.min_p).softmax(dim=-1).squeeze(0)
