"""Group-wise asymmetric int4 weights, and the linear layer that keeps them packed.

A group is 32 consecutive input columns of one output row; each weight is a 4-bit code q in [0, 15]:
    w = scale * q + min                              GGUF Q4_1 (Q4_0 is the case min = -8 * scale)
PyTorch's int4 kernels (CPU `_weight_int4pack_mm_for_cpu`, CUDA `_weight_int4pack_mm`) compute
    w = (q - 8) * s + z        with scales_and_zeros[g, n] = (s, z)   (checked numerically on torch 2.13)
so a GGUF block converts with the same codes and s = scale, z = min + 8 * scale: no re-quantization, and
exact in fp32 (`Int4Groups`). Not lossless as packed: every kernel (PyTorch's, and Freehold's, which reads the
same buffer) takes (s, z) as bf16, so s and z are rounded to 8 significant bits (relative error <= 2^-8 each):
each weight moves by at most 2^-8 (8 |s| + |z|) (tests/unit/test_quant_linear.py). On the default model that
changes s in 93% and z in 20% of the groups, at most 4.6% of a quantization step per weight (relative RMS
2.0e-3), and moved perplexity by -0.058% on 8,192 pydoc tokens (fp32 weights with and without the rounding).
Prompt rows multiply by the weight rebuilt from these and rounded once more, to bf16 (freehold.quant.compute).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from freehold.errors import UnsupportedModelError
from freehold.kernels import checks, native
from freehold.models.gguf_loader import GGUFTensor
from freehold.quant.compute import COMPUTE_DTYPE, by_row_kind, gemm_is_native
from freehold.quant.int4_unpack import layout_matches, unpack_codes_t

GROUP_SIZE = 32  # GGUF Q4_0 / Q4_1 block size; also the smallest group the kernels accept
GGUF_INT4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


@dataclass(frozen=True)
class Int4Groups:
    """Codes and per-group affine parameters of an [N, K] weight: w = scales * codes + mins, group-wise."""

    codes: torch.Tensor  # [N, K] uint8 in [0, 15]
    scales: torch.Tensor  # [N, K / 32] fp32
    mins: torch.Tensor  # [N, K / 32] fp32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """-> fp32 [N, K]."""
        n, k = self.shape
        q = self.codes.view(n, k // GROUP_SIZE, GROUP_SIZE).float()
        return (q * self.scales[..., None] + self.mins[..., None]).view(n, k)


def can_int4(shape: tuple[int, ...]) -> bool:
    """The kernels need whole groups along K and output rows in multiples of 16."""
    return len(shape) == 2 and shape[1] % GROUP_SIZE == 0 and shape[0] % 16 == 0


def quantize_int4(weight: torch.Tensor) -> Int4Groups:
    """Float [N, K] -> asymmetric group-wise int4: scale = (max - min) / 15, q = round((w - min) / scale)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = (hi - lo) / 15
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: every code is 0
    codes = ((w - lo[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Groups(codes.reshape(n, k), scales, lo)


def int4_groups_from_gguf(tensor: GGUFTensor) -> Int4Groups:
    """GGUF Q4_0 / Q4_1 rows -> the same codes and scales, no loss.

    Q4_0 block (18 bytes): fp16 d, 16 bytes of codes; w = d * (q - 8).
    Q4_1 block (20 bytes): fp16 d, fp16 m, 16 bytes of codes; w = d * q + m.
    Code byte j holds q[j] in its low nibble and q[j + 16] in its high nibble.
    """
    if tensor.qtype not in GGUF_INT4_TYPES:
        raise UnsupportedModelError(f"{tensor.name}: {tensor.qtype.name} is not a 4-bit GGUF type with 32-blocks")
    n, k = tensor.shape
    blocks = np.ascontiguousarray(tensor.data).reshape(n, k // GROUP_SIZE, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if tensor.qtype is GGMLQuantizationType.Q4_1:
        m, qs = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32), blocks[..., 4:]
    else:
        m, qs = -8 * d, blocks[..., 2:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k)
    return Int4Groups(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m))


def kernel_scales_and_zeros(groups: Int4Groups, dtype: torch.dtype) -> torch.Tensor:
    """-> [K / 32, N, 2] with (s, z) = (scale, min + 8 * scale), the kernels' (q - 8) * s + z convention."""
    zeros = groups.mins + 8 * groups.scales
    return torch.stack([groups.scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)


@dataclass(frozen=True)
class Int4Packed:
    """An [N, K] int4 weight in the kernel's layout for its device (CPU and CUDA layouts differ)."""

    packed: torch.Tensor  # opaque uint8 / int32 layout
    scales_and_zeros: torch.Tensor  # [K / 32, N, 2] bf16
    shape: tuple[int, int]
    unpackable: bool  # the codes can be read back from `packed` (freehold.quant.int4_unpack)


def pack_int4(groups: Int4Groups, device: torch.device | str) -> Int4Packed:
    if not can_int4(groups.shape):
        raise UnsupportedModelError(f"int4 needs K % {GROUP_SIZE} == 0 and N % 16 == 0, got shape {groups.shape}")
    device = torch.device(device)
    sz = kernel_scales_and_zeros(groups, COMPUTE_DTYPE).to(device)
    codes = groups.codes
    if device.type == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        return Int4Packed(packed, sz, groups.shape, layout_matches(packed, codes))
    k = groups.shape[1]
    inner_k_tiles = 8 if k % 256 == 0 else 4 if k % 128 == 0 else 2
    two_per_byte = (codes[:, ::2] << 4 | codes[:, 1::2]).to(device)  # CUDA takes [N, K / 2] uint8, high nibble first
    return Int4Packed(torch._convert_weight_to_int4pack(two_per_byte, inner_k_tiles), sz, groups.shape, False)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x: [T, K] in the scales' dtype -> [T, N] by PyTorch's kernel."""
    if x.device.type == "cpu":
        return torch._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_and_zeros)
    return torch._weight_int4pack_mm(x, packed, GROUP_SIZE, scales_and_zeros)


def native_int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                       n: int) -> torch.Tensor | None:
    """x: fp32 [T, K] -> fp32 [T, N] by Freehold's kernel (kernels/quant_matmul.c, fp32 arithmetic, reads the
    packed CPU layout in place), or None where it is unavailable."""
    kernel = native.int4_matmul()
    if kernel is None:
        return None
    x = x.contiguous()
    checks.int4_operands(x, packed)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if kernel(x.data_ptr(), y.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), x.shape[0], n, x.shape[1]):
        return None
    return y


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W held packed as int4 (0.5 byte + 4 / 32 byte of bf16 (s, z) per weight).

    On CPU, where the packed layout is the one `int4_unpack` reads (checked at packing), the path follows the
    row's kind (freehold.quant.compute), never the batch size:
      decode rows: Freehold's kernel (kernels/quant_matmul.c, AVX512-VNNI) multiplies fp32 activations by the
        packed codes in place (integer sums over fixed-point activations, each row on its own); measured at
        batch 1 with the weights in cache it runs at 2x PyTorch's int4 kernel, from ~16 rows on about as fast;
      prompt rows (with native bf16): W^T is rebuilt for that call with the kernel's arithmetic, rounded to bf16,
        and one bf16 GEMM follows (bf16 activations).
    Elsewhere (CUDA, another layout, no C compiler) PyTorch's int4 kernel multiplies every row, with bf16
    activations.
    """

    def __init__(self, weight: Int4Packed, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.unpackable = weight.unpackable
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales_and_zeros", weight.scales_and_zeros)
        self.register_buffer("bias", bias)  # float, or meta until load_state_dict fills it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] in any float dtype -> [T, N] in x's dtype."""
        if self.unpackable and gemm_is_native(x):
            y = by_row_kind(x, self._kernel, self._dequantized_gemm)
        else:
            y = self._kernel(x)
        bias = self._buffers["bias"]
        y = y.to(x.dtype)  # no copy on the decode path (fp32 in, fp32 out)
        return y if bias is None else y + bias.to(x.dtype)

    def prompt_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """What forward() computes for prompt rows where `has_prompt_gemm(x)`, before converting it back to x's
        dtype: x W^T as the bf16 GEMM gives it, bf16 [T, N]. A direct call: no module hooks run."""
        return self._dequantized_gemm(x)

    def has_prompt_gemm(self, x: torch.Tensor) -> bool:
        """Whether forward() sends x's prompt rows to the bf16 GEMM with no bias after it (see prompt_gemm)."""
        return self.unpackable and self._buffers["bias"] is None and gemm_is_native(x)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Decode rows: Freehold's kernel (fp32 out) where the layout is its own, else PyTorch's (bf16 out)."""
        buffers = self._buffers  # one dict instead of nn.Module.__getattr__ calls: this runs 120x a token
        packed, scales_and_zeros = buffers["packed"], buffers["scales_and_zeros"]
        y = native_int4_matmul(x.float(), packed, scales_and_zeros, self.out_features) if self.unpackable else None
        return int4_matmul(x.to(COMPUTE_DTYPE), packed, scales_and_zeros) if y is None else y

    def _dequantized_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt rows: W^T rebuilt for this call with the kernel's arithmetic, rounded to bf16, one bf16 GEMM."""
        return x.to(COMPUTE_DTYPE) @ self.dequantize_t(COMPUTE_DTYPE)

    @staticmethod
    def concat(layers: list[Int4Linear], bias: torch.Tensor | None) -> Int4Linear | None:
        """One layer whose output is the layers' outputs side by side, or None where the layout cannot be joined
        (only the 64-row-block CPU layout is known to concatenate along N). `bias`: the joined bias, or None."""
        if not all(layer.unpackable for layer in layers) or len({layer.in_features for layer in layers}) != 1:
            return None
        packed = torch.cat([layer.packed for layer in layers])  # [sum N / 64, K, 32]
        sz = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)  # [K / 32, sum N, 2]
        n = sum(layer.out_features for layer in layers)
        return Int4Linear(Int4Packed(packed, sz, (n, layers[0].in_features), True), bias)

    def dequantize_t(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T [K, N] from the packed codes: (q - 8) * s + z in fp32, rounded once to `dtype` (as the kernel). bf16
        is what prompt rows multiply by, rebuilt for every call: Freehold's kernel writes it in one pass where it
        runs (kernels/quant_matmul.c, the same bits, NaN bits aside: tests/unit/test_quant_kernels.py; 3-5x faster
        than the torch ops below on the default model's shapes, docs/performance.md)."""
        k, n = self.in_features, self.out_features
        native_layout = self.unpackable and self.scales_and_zeros.dtype == torch.bfloat16  # CPU, the layout it reads
        rebuild = native.int4_dequantize_t() if dtype is torch.bfloat16 and native_layout else None
        if rebuild is not None:
            wt = torch.empty(k, n, dtype=torch.bfloat16)
            if rebuild(self.packed.data_ptr(), self.scales_and_zeros.data_ptr(), wt.data_ptr(), n, k) == 0:
                return wt
        codes = unpack_codes_t(self.packed, (n, k)).view(k // GROUP_SIZE, GROUP_SIZE, n)
        s, z = (self.scales_and_zeros[..., i].float()[:, None, :] for i in (0, 1))  # [K / 32, 1, N]
        return codes.float().sub_(8).mul_(s).add_(z).to(dtype).view(k, n)

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel multiplies by, fp32 [N, K] (rounded to bf16 where the layout cannot be read)."""
        if self.unpackable:
            return self.dequantize_t(torch.float32).T.contiguous()
        eye = torch.eye(self.in_features, dtype=COMPUTE_DTYPE, device=self.packed.device)  # slow, but any layout
        return int4_matmul(eye, self.packed, self.scales_and_zeros).float().T.contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP_SIZE}"

