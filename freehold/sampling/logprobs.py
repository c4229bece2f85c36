"""Token logprobs from raw logits: the one rule for generated tokens (the sampler) and prompt tokens (the runner).

    logprob(t | row) = log_softmax(logits[row])[t]        rank(t) = 1 + #{u : logprob(u) > logprob(t)}

on the RAW model logits (before penalties, masks or temperature), as OpenAI and vLLM report them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from freehold.types import TokenLogprob


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int]) -> list[TokenLogprob]:
    """logits [R, V] (raw, any float dtype), token_ids [R] -> per row the token's logprob, its rank and the top-ks[r]
    alternatives, most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [R, 1]
    ranks = (logprobs > chosen).sum(dim=-1).add_(1).tolist()
    top_values, top_ids = (v.tolist() for v in logprobs.topk(max(ks, default=0), dim=-1))
    return [TokenLogprob(token_id=t, logprob=lp, top=tuple(zip(top_ids[r][:k], top_values[r][:k])), rank=rank)
            for r, (t, lp, k, rank) in enumerate(zip(token_ids.tolist(), chosen.squeeze(1).tolist(), ks, ranks))]
