"""A quantized embedding / LM head kept as a bf16 table: what `--weights auto` does with a GGUF's Q8_0 table.

Q8_0 stores w = d * q per 32-block (d fp16, q int8). Re-quantizing that to per-row int8 (the kernels' layout)
re-rounds every block but the row's largest and cost +0.17% perplexity on the default model's tied
embedding / LM head; bf16 keeps every value to a relative 2^-9 (-0.015%, i.e. within noise of fp32) at twice
int8's bytes. Lookups read bf16 rows; the head is one bf16 GEMM (native on AVX512-BF16/AMX CPUs and on GPUs)
with the activations rounded to bf16 as the int kernels do. Outputs come back in the caller's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from freehold.quant.compute import COMPUTE_DTYPE


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


class Bf16Linear(nn.Module):
    """y = x W^T (+ b), W a bf16 [N, K] table (shared with a `Bf16Embedding` when tied)."""

    def __init__(self, table: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = table.shape
        self.register_buffer("table", table.to(COMPUTE_DTYPE))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(COMPUTE_DTYPE), self.table).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.table.float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"
