"""The sampling distribution: temperature -> top-k -> top-p -> min-p, then the draw.

Pure tensor functions over logits [B, V] with per-row parameter tensors [B]. A filtered-out token gets
logit -inf, so softmax gives it probability exactly 0 and the draw can never pick it.

The draw is the exponential race (the Gumbel-max trick in another form): with q_i ~ Exponential(1) iid,
    token = argmax_i p_i / q_i    =>    P(token = i) = p_i
because q_i / p_i ~ Exponential(rate p_i) and the first of independent exponential clocks to ring is
clock i with probability p_i / sum_j p_j. It is computed in log space, argmax_i (l_i - log q_i), which is
the same argmax (log p_i = l_i - logsumexp(l)) and needs no softmax. Each row's noise q comes from that
row's own generator, so a seeded row draws the same token whatever else shares its batch.

`transform_probs` is the analytic distribution the sampler draws from, for tests and the inspect tool.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")
# Temperatures below this are treated as greedy (argmax): dividing logits by ~0 overflows (vLLM uses 1e-5).
GREEDY_TEMPERATURE = 1e-5


def is_greedy_temperature(temperature: float) -> bool:
    return temperature < GREEDY_TEMPERATURE


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """l' = l / T, T: [B] (all > 0)."""
    return logits / temperature.unsqueeze(1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """One ascending sort serves both filters (top_k: long [B] in [1, V]; top_p: [B] in (0, 1]).
    top-k: keep l_i >= the k-th largest logit (ties at the threshold are all kept).
    top-p: keep the smallest most-likely set whose mass is >= p: in ascending order, drop token i while
           the mass of tokens up to and including i is <= 1 - p; the most likely token is always kept."""
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (vocab_size - top_k).clamp(min=0).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, NEG_INF)
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop p_i < min_p * max_j p_j (min_p: [B]); the most likely token always survives."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def draw_exponential_race(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """token_b = argmax_i (l_bi - log q_bi), q ~ Exponential(1) [B, V]; see the module docstring.
    q is clamped away from 0 so log q is finite and a -inf logit can never win."""
    q = noise.clamp(min=torch.finfo(noise.dtype).tiny)
    return (logits - q.log()).argmax(dim=-1)


def transform_probs(logits_1d: torch.Tensor, temperature: float, top_k: int | None = None,
                    top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The distribution [V] the sampler draws from for one row whose (already penalized) logits are
    logits_1d. Greedy temperatures give a one-hot vector at the argmax."""
    logits = logits_1d.float().unsqueeze(0)
    if is_greedy_temperature(temperature):
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[1]).squeeze(0).float()
    vocab_size = logits.shape[1]
    logits = apply_temperature(logits, torch.tensor([temperature], device=logits.device))
    k = torch.tensor([min(top_k, vocab_size) if top_k is not None else vocab_size], device=logits.device)
    logits = apply_top_k_top_p(logits, k, torch.tensor([top_p], device=logits.device))
    logits = apply_min_p(logits, torch.tensor([min_p], device=logits.device))
    return logits.softmax(dim=-1).squeeze(0)
