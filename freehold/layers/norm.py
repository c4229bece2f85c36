"""RMSNorm, y = x / sqrt(mean(x^2) + eps) * weight, in fp32 as Hugging Face computes it, and the residual add
that precedes it in a decoder layer (vLLM's fused form):
    add_and_norm(x, residual) = (norm(x + residual), x + residual)
On CPU with fp32 activations both run as one native call per batch (kernels/rms_norm.c); elsewhere as PyTorch ops.
"""
from __future__ import annotations

import torch
from torch import nn

from freehold.kernels import checks, native


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> normalized, same shape and dtype."""
        return self._norm(x, None, store_sum=False)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(x + residual), x + residual); a None residual is zero (the first layer)."""
        return self._norm(x, residual, store_sum=True)

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None, store_sum: bool):
        weight = self._parameters["weight"]  # not nn.Module.__getattr__: this runs 60x a token
        kernel = native.add_rms_norm() if _native_ok(x, residual, weight) else None
        if kernel is not None:
            x = x.contiguous()
            checks.rms_norm_operands(x, weight)
            y = torch.empty_like(x)
            total = torch.empty_like(x) if store_sum else None
            kernel(x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(),
                   total.data_ptr() if total is not None else None, y.data_ptr(), x.numel() // x.shape[-1],
                   x.shape[-1], self.eps)
            return y, total
        total = x if residual is None else x + residual
        dtype = total.dtype
        h = total.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(dtype), total


def _native_ok(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (residual is None or (residual.dtype == torch.float32 and residual.is_contiguous()
                                      and residual.shape == x.shape)))
