"""Reading int4 codes back out of the CPU kernel's packed layout, so prefill can dequantize without a second copy.

`torch._convert_weight_to_int4pack_for_cpu` (torch 2.13, AVX512 kernels) stores each block of 64 output rows as
[K, 32] bytes: byte j of column k holds row j in its low nibble and row j + 32 in its high nibble. So
    codes[64 b + r, k] = packed[b, k, r] & 15          for r < 32
                       = packed[b, k, r - 32] >> 4     for r >= 32
The layout is private to PyTorch and differs across CPU builds (AVX2 uses 32-row blocks, a tail block of
16/32/48 rows another format), so `layout_matches` checks it against the codes that were packed; a layer
whose check fails simply keeps using the kernel at every batch size.
"""
from __future__ import annotations

import torch

BLOCK_ROWS = 64


def can_unpack(shape: tuple[int, int]) -> bool:
    return shape[0] % BLOCK_ROWS == 0


def unpack_codes_t(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """packed (CPU layout) -> codes^T, uint8 [K, N]. Transposed because building W^T is the cheaper copy
    (64-byte runs) and `x @ W^T` is what a linear layer computes anyway."""
    n, k = shape
    blocks = packed.view(n // BLOCK_ROWS, k, BLOCK_ROWS // 2)  # [N / 64, K, 32] bytes
    rows = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # [N / 64, K, 64]: rows 0..31, then 32..63
    return rows.transpose(0, 1).reshape(k, n)


def layout_matches(packed: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether `unpack_codes_t` reads `packed` back into exactly `codes` ([N, K])."""
    shape = tuple(codes.shape)
    return packed.device.type == "cpu" and can_unpack(shape) and torch.equal(
        unpack_codes_t(packed, shape), codes.to(torch.uint8).T)
