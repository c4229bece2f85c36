"""The sampling distribution: temperature -> top-k -> top-p -> min-p.

Pure tensor functions over logits [B, V]. A per-row parameter is a `Column`: one Python number shared by every
row (the usual case: no tensor to build, the op takes a scalar), or a [B, 1] tensor with one value per row.
A filtered-out token gets logit -inf (or weight 0), so it has probability exactly 0 and the draw (draw.py)
can never pick it.

top-k and top-p need the most likely tokens in order. Instead of sorting the whole vocabulary, the sampler
takes the top K candidates (K = the largest top_k, or CANDIDATES for top-p) and filters those
(`filter_candidates`); that is exact whenever the candidates hold every kept token: always for top-k, and for
top-p when the candidates' mass reaches p. Otherwise it falls back to a full sort (`apply_top_k_top_p`).
Temperature commutes with top-k (l -> l / T with T > 0 keeps the order), so the candidates are taken on the
penalized logits and only their K values are divided by T.

`transform_probs` is the analytic distribution the sampler draws from (by full sort), for tests and the
inspect tool.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch

NEG_INF = float("-inf")
# Temperatures below this are treated as greedy (argmax): dividing logits by ~0 overflows (vLLM uses 1e-5).
GREEDY_TEMPERATURE = 1e-5
CANDIDATES = 256  # top-p works on this many most likely tokens when they hold enough mass

Column = Union[float, int, torch.Tensor]  # a per-row parameter: one number for all rows, or a [B, 1] tensor


def is_greedy_temperature(temperature: float) -> bool:
    return temperature < GREEDY_TEMPERATURE


def apply_temperature(logits: torch.Tensor, temperature: Column) -> torch.Tensor:
    """l' = l / T (T > 0)."""
    return logits / temperature


def apply_top_k_top_p(logits: torch.Tensor, top_k: Column | None, top_p: Column | None) -> torch.Tensor:
    """One ascending sort serves both filters (top_k in [1, V], V = off; top_p in (0, 1], 1 = off).
    top-k: keep l_i >= the k-th largest logit (ties at the threshold are all kept).
    top-p: keep the smallest most-likely set whose mass is >= p: in ascending order, drop token i while
           the mass of tokens up to and including i is <= 1 - p; the most likely token is always kept."""
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)
    if top_k is not None:
        start = vocab_size - torch.as_tensor(top_k, device=logits.device).reshape(-1, 1)
        kth_largest = sorted_logits.gather(1, start.clamp(min=0).expand(logits.shape[0], 1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, NEG_INF)
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: Column) -> torch.Tensor:
    """Drop p_i < min_p * max_j p_j; the most likely token always survives."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), NEG_INF)


def min_p_weights(probs: torch.Tensor, min_p: Column) -> torch.Tensor:
    """`apply_min_p` on probabilities (or any weights proportional to them): w_i -> 0 where
    w_i < min_p * max_j w_j (the ratio does not depend on the normalization)."""
    return probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)


class Candidates(NamedTuple):
    token_ids: torch.Tensor  # long [B, K], most likely first
    weights: torch.Tensor  # fp32 [B, K]: probability of each candidate after top-k, top-p, min-p (0 = dropped)
    covered: torch.Tensor | None  # bool [B]: the candidates hold every kept token (else: full sort); None: all


def filter_candidates(logits: torch.Tensor, temperature: Column, top_k: Column | None, top_p: Column | None,
                      min_p: Column | None, num_candidates: int) -> Candidates:
    """Temperature, top-k, top-p and min-p computed on the top `num_candidates` tokens only.
    logits: [B, V] penalized, before temperature. Every row has top-k or top-p. top_k: None (no row), or in
    [1, num_candidates] with V meaning off for that row; top_p: None (no row), or in (0, 1] with 1 meaning off;
    min_p: None (no row), or in [0, 1].
    In descending order token j is kept by top-p iff the mass strictly before it is < p, the mass being
    normalized over the top-k set (top-k applies first) or, without top-k, over the whole vocabulary."""
    vocab_size = logits.shape[1]
    values, token_ids = logits.topk(min(num_candidates, vocab_size), dim=-1)  # [B, K] descending
    values = values / temperature
    if top_k is not None and not (isinstance(top_k, int) and top_k >= values.shape[1]):
        values = values.masked_fill(torch.arange(values.shape[1], device=logits.device) >= top_k, NEG_INF)
    probs = values.softmax(dim=-1)  # normalized over the top-k set
    if top_p is None:
        return Candidates(token_ids, probs if min_p is None else _min_p_sorted(probs, min_p), None)
    k_active = top_k < vocab_size if isinstance(top_k, torch.Tensor) else top_k is not None  # [B, 1] or all
    every_row_has_k = k_active if isinstance(k_active, bool) else bool(k_active.all())
    if not every_row_has_k:  # rows with top-p alone: normalized over the whole vocabulary
        everything = apply_temperature(logits, temperature).softmax(dim=-1).gather(1, token_ids)
        probs = torch.where(k_active, probs, everything) if isinstance(k_active, torch.Tensor) else everything
    mass = probs.cumsum(dim=-1)  # mass up to and including j; the first token has nothing before it
    drop = mass - probs >= top_p
    if isinstance(top_p, torch.Tensor):
        drop &= top_p < 1.0
    weights = probs.masked_fill(drop, 0.0)
    weights = weights if min_p is None else _min_p_sorted(weights, min_p)
    if every_row_has_k:
        return Candidates(token_ids, weights, None)
    return Candidates(token_ids, weights, ((mass[:, -1:] >= top_p) | k_active).reshape(-1))


def _min_p_sorted(weights: torch.Tensor, min_p: Column) -> torch.Tensor:
    """`min_p_weights` for weights whose first column is the row max (candidates, most likely first)."""
    return weights.masked_fill(weights < min_p * weights[:, :1], 0.0)


def transform_probs(logits_1d: torch.Tensor, temperature: float, top_k: int | None = None,
                    top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The distribution [V] the sampler draws from for one row whose (already penalized) logits are
    logits_1d. Greedy temperatures give a one-hot vector at the argmax."""
    logits = logits_1d.float().unsqueeze(0)
    if is_greedy_temperature(temperature):
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[1]).squeeze(0).float()
    vocab_size = logits.shape[1]
    logits = apply_temperature(logits, temperature)
    logits = apply_top_k_top_p(logits, min(top_k, vocab_size) if top_k is not None else vocab_size, top_p)
    logits = apply_min_p(logits, min_p)
    return logits.softmax(dim=-1).squeeze(0)
