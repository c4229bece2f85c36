"""The sampling distribution: temperature -> top-k -> top-p -> min-p, then the draw.

Pure tensor functions over logits [B, V] with per-row parameter tensors [B]. A filtered-out token gets
logit -inf, so softmax gives it probability exactly 0 and the draw can never pick it.

The draw is inverse-CDF sampling with one uniform per row: with c_i = sum_{j<=i} p_j and u ~ U[0, 1),
    token = the first i with c_i > u * c_V    =>    P(token = i) = (c_i - c_{i-1}) / c_V = p_i
The cumulative sum is taken in float64 so the rounding of 10^5 small terms cannot bias the draw. Each row's
u comes from that row's own generator, so a seeded row draws the same token whatever else shares its batch.

top-k and top-p need the most likely tokens in order. Instead of sorting the whole vocabulary, the sampler
takes the top K candidates (K = the largest top_k, or CANDIDATES for top-p); that is exact whenever the
candidates hold every kept token: always for top-k, and for top-p when the candidates' mass reaches p.
Otherwise it falls back to a full sort (`apply_top_k_top_p`).

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


CANDIDATES = 256  # top-p works on this many most likely tokens when they hold enough mass


def top_k_top_p_candidates(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                           num_candidates: int) -> torch.Tensor | None:
    """The same filter as `apply_top_k_top_p` computed on the top `num_candidates` logits only
    (top_k: long [B] in [1, V], V meaning off; top_p: [B], 1.0 meaning off). None when some row's top-p set
    may reach past the candidates (then the caller sorts everything).
    In descending order token j is kept by top-p iff the mass strictly before it is < p, where the mass is
    normalized over the top-k set (top-k applies first)."""
    vocab_size = logits.shape[1]
    values, index = logits.topk(min(num_candidates, vocab_size), dim=-1)  # [B, K] descending
    position = torch.arange(values.shape[1], device=logits.device).unsqueeze(0)
    k_kept = position < top_k.unsqueeze(1)
    k_active = top_k < vocab_size
    full_lse = logits.logsumexp(dim=-1)  # normalizer over the whole vocabulary (rows without top-k)
    kept_values = values.masked_fill(~k_kept, NEG_INF)
    lse = torch.where(k_active, kept_values.logsumexp(dim=-1), full_lse)
    mass = (kept_values - lse.unsqueeze(1)).exp().cumsum(dim=-1)  # mass up to and including j
    p_active = top_p < 1.0
    covered = ~p_active | k_active & (top_k <= values.shape[1]) | (mass[:, -1] >= top_p)
    if not bool(covered.all()) or bool((k_active & (top_k > values.shape[1])).any()):
        return None
    before = mass - (kept_values - lse.unsqueeze(1)).exp()
    p_kept = ~p_active.unsqueeze(1) | (before < top_p.unsqueeze(1))
    p_kept[:, 0] = True
    kept = k_kept & p_kept
    out = torch.full_like(logits, NEG_INF).scatter_(1, index, values.masked_fill(~kept, NEG_INF))
    return torch.where((k_active | p_active).unsqueeze(1), out, logits)  # unfiltered rows keep every token


def draw_inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """token_b = first i with cumsum(p_b)_i > u_b * sum(p_b), u: [B] in [0, 1); see the module docstring."""
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp(max=logits.shape[1] - 1)


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
