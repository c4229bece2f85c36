"""Per-channel symmetric int8 weights: the linear layer, and the embedding that shares its table with a tied LM head.

    w[n, k] = scale[n] * q[n, k],   q in [-127, 127],   scale[n] = max_k |w[n, k]| / 127

GGUF Q8_0 has one scale per 32-block instead; converting it to per-row scales re-rounds every block but the
row's largest (its scale is the row's absmax / 127 exactly), adding an error of at most scale[n] / 2 per weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from freehold.quant.compute import COMPUTE_DTYPE, by_row_kind, gemm_is_native


@dataclass(frozen=True)
class Int8Rows:
    """An [N, K] weight as int8 codes and one fp32 scale per row."""

    data: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] fp32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def dequantize(self) -> torch.Tensor:
        """-> fp32 [N, K]."""
        return self.data.float() * self.scales[:, None]

    def to(self, device: torch.device | str) -> Int8Rows:
        return Int8Rows(self.data.to(device), self.scales.to(device))


def quantize_int8(weight: torch.Tensor) -> Int8Rows:
    """Float [N, K] -> q = round(w / scale), scale = absmax / 127 per row (an all-zero row keeps scale 0)."""
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    data = (w / safe[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Rows(data.contiguous(), scales)


def int8_matmul(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x: [T, K], scales in x's dtype -> [T, N] = x (scales * data)^T: on CPU the int8 kernel for decode rows and
    a dequantized GEMM for prompt rows (the kernel for every row without native bf16)."""
    def dequantized(rows: torch.Tensor) -> torch.Tensor:
        return F.linear(rows, data.to(x.dtype) * scales[:, None])  # CUDA has no int8 weight-only kernel: gpt-fast's way

    def kernel(rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, data, scales)

    if x.device.type != "cpu":
        return dequantized(x)
    return by_row_kind(x, kernel, dequantized) if gemm_is_native(x) else kernel(x)


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W held as per-channel int8 (1 byte + 6 / K bytes of scales per weight).

    On CPU decode rows run PyTorch's int8 kernel; for prompt rows the weight is dequantized to bf16 for that call
    only (see freehold.quant.compute: the path follows the row's kind, not the batch size). Compute is bf16 on CPU
    either way; outputs come back in the caller's dtype.
    """

    def __init__(self, rows: Int8Rows, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = rows.shape
        self.register_buffer("data", rows.data)
        self.register_buffer("scales", rows.scales)
        self.register_buffer("kernel_scales", rows.scales.to(COMPUTE_DTYPE))
        self.register_buffer("bias", bias)  # float, or meta until load_state_dict fills it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] in any float dtype -> [T, N] in x's dtype."""
        compute = COMPUTE_DTYPE if x.device.type == "cpu" else x.dtype
        scales = self.kernel_scales if compute == COMPUTE_DTYPE else self.scales.to(compute)
        y = int8_matmul(x.to(compute), self.data, scales).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return Int8Rows(self.data, self.scales).dequantize()

    @staticmethod
    def concat(layers: list[Int8Linear], bias: torch.Tensor | None) -> Int8Linear | None:
        """One layer whose output is the layers' outputs side by side (rows are independent)."""
        if len({layer.in_features for layer in layers}) != 1:
            return None
        rows = Int8Rows(torch.cat([layer.data for layer in layers]), torch.cat([layer.scales for layer in layers]))
        return Int8Linear(rows, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Embedding(nn.Module):
    """Token embedding over an int8 table: a lookup dequantizes only the looked-up rows, so the float table is
    never resident. Output is fp32 [T, E] (the model casts it to its activation dtype). A tied LM head is an
    `Int8Linear` built from the same `Int8Rows`, so both hold one table."""

    def __init__(self, rows: Int8Rows):
        super().__init__()
        self.num_embeddings, self.embedding_dim = rows.shape
        self.register_buffer("data", rows.data)
        self.register_buffer("scales", rows.scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] int64 -> fp32 [T, E]: scale[id] * q[id]."""
        return self.data[ids].float() * self.scales[ids, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
