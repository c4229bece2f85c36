"""A quantized embedding / LM head kept as a bf16 table: what `--weights auto` does with a GGUF's Q8_0 table.

Q8_0 stores w = d * q per 32-block (d fp16, q int8). Re-quantizing that to per-row int8 (the kernels' layout)
re-rounds every block but the row's largest and cost +0.17% perplexity on the default model's tied
embedding / LM head; bf16 keeps every value to a relative 2^-8 (-0.015%, i.e. within noise of fp32) at twice
int8's bytes. Lookups read bf16 rows; the head multiplies bf16 activations by the table (Freehold's kernel for
decode rows, one bf16 GEMM for prompt rows: see `Bf16Linear`). Outputs come back in the caller's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from freehold.kernels import checks, native
from freehold.quant.compute import COMPUTE_DTYPE, by_row_kind


class Bf16Embedding(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.register_buffer("table", table.to(COMPUTE_DTYPE))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> [T, E] fp32 (the model casts it to its activation dtype)."""
        return self.table[ids].float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bf16"


def native_bf16_matmul(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """x: bf16 [T, K] -> fp32 [T, N] = x W^T by Freehold's kernel (kernels/quant_matmul.c), or None where it is
    unavailable (not CPU, no compiler)."""
    kernel = native.bf16_matmul() if x.device.type == "cpu" else None
    if kernel is None:
        return None
    x = x.contiguous()
    checks.bf16_operands(x, table)
    y = torch.empty(x.shape[0], table.shape[0], dtype=torch.float32)
    status = kernel(x.data_ptr(), y.data_ptr(), table.data_ptr(), x.shape[0], table.shape[0], table.shape[1])
    return None if status else y


class Bf16Linear(nn.Module):
    """y = x W^T (+ b), W a bf16 [N, K] table (shared with a `Bf16Embedding` when tied).

    On CPU, decode rows (the engine's logits rows, at any batch size: freehold.quant.compute) go through
    Freehold's kernel: it reads the table once for all rows at memory speed (PyTorch's bf16 GEMM takes ~1.6x as
    long for one row on the development machine) and a row's result does not depend on the batch. Prompt rows
    (perplexity over whole windows, direct model calls) use PyTorch's GEMM.
    """

    def __init__(self, table: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = table.shape
        self.register_buffer("table", table.to(COMPUTE_DTYPE))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] in any float dtype -> [T, N] in x's dtype; x is rounded to bf16 on every path."""
        table = self.table

        def kernel(rows: torch.Tensor) -> torch.Tensor:
            y = native_bf16_matmul(rows, table)
            return F.linear(rows, table) if y is None else y

        y = by_row_kind(x.to(COMPUTE_DTYPE), kernel, lambda rows: F.linear(rows, table)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.table.float()

    @staticmethod
    def concat(layers: list[Bf16Linear], bias: torch.Tensor | None) -> Bf16Linear | None:
        if len({layer.in_features for layer in layers}) != 1:
            return None
        return Bf16Linear(torch.cat([layer.table for layer in layers]), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"
