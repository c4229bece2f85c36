"""The draw: inverse-CDF sampling with one uniform per row.

With weights w_i >= 0 (unnormalized probabilities), c_i = w_1 + ... + w_i and u ~ U[0, 1):
    token = the first i with c_i > u * c_V    =>    P(token = i) = (c_i - c_{i-1}) / c_V = w_i / sum_j w_j
A token with w_i = 0 is never drawn (c does not grow at i). The sums are float64, so the rounding of 10^5
small terms cannot bias the tail. Each row's u comes from that row's own generator, so a seeded row draws
the same token whatever else shares its batch.

Two-level form (`draw_inverse_cdf_chunked`): split the row into C chunks of L tokens, S_c = the chunk sums,
E_c = S_1 + ... + S_c (the CDF at the chunk ends, E_0 = 0). Then
    chunk  c = the first c with E_c > u * E_C
    token  j = the first j with E_{c-1} + (w_{c,1} + ... + w_{c,j}) > u * E_C
is the same token i as above: both are c_i > u * c_V with c_i summed in a different order (float64, relative
difference ~1e-16). The row is read once, for the chunk sums; the cumulative sums run over C + L entries.
"""
from __future__ import annotations

import torch

from freehold.sampling.chunked import power_of_two_chunk


def draw_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """token_b = the first i with cumsum(w_b)_i > u_b * sum(w_b); weights: [B, N] >= 0 with a positive entry
    in each row, uniforms: [B] in [0, 1). Returns long [B] in [0, N)."""
    cdf = weights.double().cumsum(dim=-1)
    target = cdf[:, -1:] * uniforms.double().unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)


def draw_inverse_cdf_chunked(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The same draw as `draw_inverse_cdf` (see the module docstring) with one pass over the row."""
    batch, n = weights.shape
    length = power_of_two_chunk(n)
    if length == 1:
        return draw_inverse_cdf(weights, uniforms)
    chunks = weights.reshape(batch, n // length, length)
    ends = weights.new_zeros(batch, n // length + 1, dtype=torch.float64)  # E_0 = 0, E_1 .. E_C
    torch.cumsum(chunks.sum(dim=-1, dtype=torch.float64), dim=-1, out=ends[:, 1:])
    target = ends[:, -1:] * uniforms.double().unsqueeze(1)  # u * E_C < E_C: some chunk is chosen
    chunk = torch.searchsorted(ends, target, right=True) - 1  # [B, 1]: E_c <= target < E_{c+1}, from E_0 = 0
    chunk.clamp_(0, n // length - 1)  # only NaN weights could leave the range
    inside = chunks.gather(1, chunk.unsqueeze(2).expand(batch, 1, length)).squeeze(1)  # [B, L] chunk c
    return chunk.squeeze(1) * length + first_above(inside, target - ends.gather(1, chunk))  # residual from E_c


def first_above(weights: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The first j with w_1 + ... + w_j > residual in each row (weights [B, L], residual float64 [B, 1] >= 0).
    The chunk was chosen on a sum added in another order, so float64 rounding may put the residual a hair
    past the row's own total; it is then taken just below the total, which picks the row's last positive
    weight: a zero weight is never returned."""
    cdf = weights.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    residual = torch.minimum(residual, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, residual, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)
