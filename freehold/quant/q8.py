"""A GGUF Q8_0 table kept as stored: what `--weights auto` does with a Q8_0 embedding / tied LM head on CPU.

    w[n, k] = d[n, b] * q[n, k],   b = k / 32,   q int8, d fp16         (34 bytes per 32 weights in the file)
Held as int8 codes [N, K] and fp16 scales [N, K / 32]: 1.0625 bytes per weight, every value exactly the file's
(re-quantizing per row cost +0.17% perplexity on the default model; a bf16 copy rounds each value to 8 bits and
takes twice the bytes). A lookup dequantizes the looked-up rows; the LM head runs Freehold's kernel
(kernels/quant_matmul.c: fp32 activations, exact products, fp32 sums), which reads the table once per step.
Like every packed layer it chooses by row kind (freehold.quant.compute): the engine's logits rows are decode rows
(the kernel, at any batch size); prompt rows (perplexity's whole windows, direct model calls) dequantize the table
to bf16 for one GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from freehold.errors import UnsupportedModelError
from freehold.kernels import checks, native
from freehold.models.gguf_loader import GGUFTensor
from freehold.quant.compute import by_row_kind

BLOCK = 32


@dataclass(frozen=True)
class Q8Blocks:
    codes: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N, K / 32] fp16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """-> fp32 [len(ids), K]: the looked-up rows, exactly."""
        n = len(ids)
        codes = self.codes[ids].view(n, -1, BLOCK).float()
        return (codes * self.scales[ids].float()[..., None]).view(n, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> [N, K] in `dtype` (built in row chunks: the fp32 table is never whole)."""
        out = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        for start in range(0, self.shape[0], 4096):
            ids = torch.arange(start, min(start + 4096, self.shape[0]), device=self.codes.device)
            out[start:start + len(ids)] = self.rows(ids).to(dtype)
        return out


def q8_blocks_from_gguf(tensor: GGUFTensor) -> Q8Blocks:
    """Q8_0 rows (per 32 weights: fp16 d, then 32 int8) -> codes and scales, bit for bit."""
    if tensor.qtype is not GGMLQuantizationType.Q8_0:
        raise UnsupportedModelError(f"{tensor.name}: {tensor.qtype.name} is not Q8_0")
    n, k = tensor.shape
    blocks = np.ascontiguousarray(tensor.data).reshape(n, k // BLOCK, 2 + BLOCK)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0]
    codes = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
    return Q8Blocks(torch.from_numpy(codes), torch.from_numpy(scales))


def native_q8_matmul(x: torch.Tensor, blocks: Q8Blocks) -> torch.Tensor | None:
    """x: fp32 [T, K] -> fp32 [T, N] by Freehold's kernel, or None where it is unavailable."""
    kernel = native.q8_matmul() if x.device.type == "cpu" else None
    if kernel is None:
        return None
    x = x.contiguous()
    checks.q8_operands(x, blocks.codes, blocks.scales)
    y = torch.empty(x.shape[0], blocks.shape[0], dtype=torch.float32)
    if kernel(x.data_ptr(), y.data_ptr(), blocks.codes.data_ptr(), blocks.scales.data_ptr(), x.shape[0],
              blocks.shape[0], x.shape[1]):
        return None
    return y


class Q8Embedding(nn.Module):
    def __init__(self, blocks: Q8Blocks):
        super().__init__()
        self.num_embeddings, self.embedding_dim = blocks.shape
        self.register_buffer("codes", blocks.codes)
        self.register_buffer("scales", blocks.scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> fp32 [T, E] (the model casts it to its activation dtype)."""
        return Q8Blocks(self.codes, self.scales).rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q8_0"


class Q8Linear(nn.Module):
    """y = x W^T (+ b) with W a Q8_0 table (shared with a `Q8Embedding` when tied)."""

    def __init__(self, blocks: Q8Blocks, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = blocks.shape
        self.register_buffer("codes", blocks.codes)
        self.register_buffer("scales", blocks.scales)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] in any float dtype -> [T, N] in x's dtype."""
        blocks = Q8Blocks(self.codes, self.scales)

        def dequantized(rows: torch.Tensor) -> torch.Tensor:
            return F.linear(rows.to(torch.bfloat16), blocks.dequantize(torch.bfloat16))

        def kernel(rows: torch.Tensor) -> torch.Tensor:
            y = native_q8_matmul(rows.float(), blocks)
            return dequantized(rows) if y is None else y

        y = by_row_kind(x, kernel, dequantized).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return Q8Blocks(self.codes, self.scales).dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0"
