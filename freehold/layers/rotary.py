"""Rotary position embedding (RoPE), "rotate half" layout as in Hugging Face Llama/Qwen.

For head dim D and pair i < D/2 at position p: theta_i = base^(-2i/D) / factor_i,
(x_i, x_{i+D/2}) -> (x_i cos(p theta_i) - x_{i+D/2} sin(p theta_i), x_{i+D/2} cos(p theta_i) + x_i sin(p theta_i)).
factor_i is 1 unless llama3 scaling (or a GGUF `rope_freqs` tensor) stretches the low frequencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from freehold.config import RopeScaling
from freehold.kernels import checks, native


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, smooth blend in between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, base: float,
                 scaling: RopeScaling | None = None, freq_factors: torch.Tensor | None = None):
        super().__init__()
        # Tables are computed on the CPU (float64) whatever the default device: built under
        # `torch.device("meta")` the ops would pull in torch's Python meta kernels (+130 MB resident, triton).
        # Module.to(device) moves them.
        cpu = torch.device("cpu")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=cpu) / head_dim))
        if scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.to(cpu, torch.float64)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=cpu), inv_freq)  # [P, D/2]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor) -> RopeTables:
        """The rotation at `positions` [T], laid out for `RopeTables.apply`."""
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D/2]
        return RopeTables(torch.cat([cos, cos], -1).unsqueeze(1), torch.cat([-sin, sin], -1).unsqueeze(1))  # contiguous

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D], positions: [T] -> [T, heads, D]"""
        return self.tables(positions).apply(x)


@dataclass(frozen=True)
class RopeTables:
    """cos and signed sin of each token's angles, both [T, 1, D]: with x = (x1, x2) in halves,
        rope(x) = x * (cos, cos) + (x2, x1) * (-sin, sin)
    which is the pairwise rotation above. Built once per forward pass, applied in every layer."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] -> [T, heads, D] in x's dtype (computed in fp32), a new tensor."""
        kernel = native.rope() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if kernel is not None and x.stride(2) == 1 and x.stride(1) == x.shape[2]:  # heads contiguous in a token
            checks.rope_operands(x, self.cos)
            t, heads, d = x.shape
            y = torch.empty(t, heads, d)
            kernel(x.data_ptr(), y.data_ptr(), self.cos.data_ptr(), self.sin.data_ptr(), t, heads, d, x.stride(0))
            return y
        xf = x.float()
        out = torch.addcmul(xf * self.cos, xf.roll(x.shape[-1] // 2, dims=-1), self.sin)
        return out.to(x.dtype)
