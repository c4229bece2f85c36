"""How packed layers multiply on CPU: PyTorch's int kernels for decode-sized batches, and a bf16 GEMM over a
weight dequantized for that one call for prefill-sized batches. Nothing dequantized stays resident.

Measured on the development machine (AMD Zen 5, AVX512-BF16, 2 threads, torch 2.13), ms per 576x1536 matmul:
    tokens                       1      64     128    512
    int4 kernel (bf16 in)      0.018  0.32   0.64   2.58
    int8 kernel (bf16 in)      0.015  0.32   0.61   2.56
    fp32 GEMM                  0.041  0.60   1.13   4.18
    bf16 GEMM                  0.067  0.22   0.32   1.04    + dequantizing W: int8 0.10, int4 0.31
The int kernels need bf16 activations (with fp32 ones they are 20-40x slower), so compute is bf16 either way
and outputs return in the caller's dtype. Decode reads each weight once per token and is bound by weight bytes:
the kernels win. Prefill is bound by arithmetic: the bf16 GEMM wins, on CPUs that multiply bf16 natively
(AVX512-BF16 or AMX); on others the kernels serve every batch size. fp32 never wins, so there is no fp32 path.
Where Freehold's own int4 kernel runs (kernels/quant_matmul.c: CPUs with AVX512-VNNI) it replaces PyTorch's int4
kernel below the dequantizing threshold and takes fp32 activations (no bf16 rounding on that path).
"""
from __future__ import annotations

import functools

import torch

COMPUTE_DTYPE = torch.bfloat16


@functools.cache
def native_bf16_gemm() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def use_dequantized(x: torch.Tensor, min_tokens: int) -> bool:
    """Whether a CPU call on x [T, K] should dequantize W for one bf16 GEMM instead of calling the int kernel."""
    return x.shape[0] >= min_tokens and x.device.type == "cpu" and native_bf16_gemm()
