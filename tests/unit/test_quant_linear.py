"""Packed int4 / int8 layers compute what dequantize-then-matmul computes.

Two levels of tolerance: the GGUF -> kernel conversion is checked exactly (fp32 kernel call), the layers are
checked against an fp32 reference given the bf16 rounding the fast kernels imply (inputs, scales, output).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from freehold.models.gguf_loader import GGUFTensor
from freehold.quant.convert import pack_weight
from freehold.quant.compute import RowKind, native_bf16_gemm, row_kinds
from freehold.quant.int4 import (GROUP_SIZE, Int4Linear, int4_groups_from_gguf, kernel_scales_and_zeros, pack_int4,
                                 quantize_int4)
from freehold.quant.int4_unpack import unpack_codes_t
from freehold.quant.int8 import Int8Embedding, Int8Linear, quantize_int8
from freehold.quant.modes import WeightFormat

Q4_0, Q4_1, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
N, K = 128, 256
TOKEN_COUNTS = (1, 5, 199)
PATHS = [RowKind.DECODE, RowKind.PROMPT]  # the row-wise kernel / the dequantized bf16 GEMM (freehold.quant.compute)
BF16_EPS = 2.0 ** -8  # relative rounding of bf16 (8 significant bits)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def gguf_tensor(qtype: GGMLQuantizationType, seed: int = 0) -> GGUFTensor:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 1.0, (N, 1)) + rng.normal(0, 0.05, (N, 1)))
    return GGUFTensor("w", qtype, (N, K), quantize(w.astype(np.float32), qtype))


def within_bf16(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float = 3 * BF16_EPS):
    """Worst case: |y - ref| <= eps * (|x| |w|^T), the bound for a dot product whose terms are rounded relatively.
    Typical case: the relative RMS error stays at bf16's rounding (a 1% scale slip fails this)."""
    err = (y.float() - ref.float()).abs()
    excess = (err / (eps * (x.abs().float() @ w.abs().float().T) + 1e-6)).max().item()
    assert excess <= 1.0, f"error {excess:.2f}x the bf16 worst-case bound"
    rel_rms = (err.pow(2).mean() / ref.float().pow(2).mean()).sqrt().item()
    assert rel_rms <= 1.5 * BF16_EPS, f"relative RMS error {rel_rms:.2e} > {1.5 * BF16_EPS:.2e}"


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1], ids=["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_convert_to_kernel_format_without_loss(qtype):
    t = gguf_tensor(qtype)
    groups = int4_groups_from_gguf(t)
    assert torch.equal(groups.dequantize(), t.dequantize())  # same codes, scales, mins: bit for bit
    # the kernel computes (q - 8) * s + z; in fp32 its weights are the GGUF weights to fp32 rounding
    packed = torch._convert_weight_to_int4pack_for_cpu(groups.codes.to(torch.int32), 1)
    scales_and_zeros = kernel_scales_and_zeros(groups, torch.float32)
    w_kernel = torch._weight_int4pack_mm_for_cpu(torch.eye(K), packed, GROUP_SIZE, scales_and_zeros).T
    torch.testing.assert_close(w_kernel, t.dequantize(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1], ids=["Q4_0", "Q4_1"])
def test_packed_int4_keeps_the_codes_and_rounds_scales_to_bf16(qtype):
    """What "from Q4_0/Q4_1" means once packed: the codes bit for bit; (s, z) rounded to bf16, so each weight
    moves by at most 2^-8 (8 |s| + |z|) (bf16's unit roundoff: 8 significant bits), and does move."""
    t = gguf_tensor(qtype)
    groups = int4_groups_from_gguf(t)
    layer = Int4Linear(pack_int4(groups, "cpu"))
    if layer.unpackable:
        assert torch.equal(unpack_codes_t(layer.packed, (N, K)), groups.codes.T)
    s, z = groups.scales, groups.mins + 8 * groups.scales  # [N, K / 32], exact in fp32
    bound = (BF16_EPS + 1e-6) * (8 * s.abs() + z.abs())
    err = (layer.dequantize() - t.dequantize()).abs().view(N, K // GROUP_SIZE, GROUP_SIZE)
    assert (err <= bound[..., None]).all()
    assert err.max() > 0


@pytest.mark.parametrize("source", ["Q4_0", "Q4_1", "float"])
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("kind", PATHS)
def test_int4_linear_matches_dequantize_then_matmul(source, num_tokens, kind):
    if source == "float":
        w = torch.randn(N, K)
        groups = quantize_int4(w)
        assert (groups.dequantize() - w).abs().max() <= groups.scales.max() / 2 + 1e-6
        w = groups.dequantize()
    else:
        t = gguf_tensor(GGMLQuantizationType[source])
        groups, w = int4_groups_from_gguf(t), t.dequantize()  # the GGUF weights are the truth
    layer = Int4Linear(pack_int4(groups, "cpu"))
    x = torch.randn(num_tokens, K)
    with row_kinds(kind):
        y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (num_tokens, N)
    within_bf16(y, F.linear(x, w), x, w)


def test_int4_prefill_path_rebuilds_exactly_the_kernels_weights():
    groups = int4_groups_from_gguf(gguf_tensor(Q4_1))
    layer = Int4Linear(pack_int4(groups, "cpu"))
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("int4_unpack reads the AVX512 kernels' layout; other builds keep the kernel at every size")
    assert layer.unpackable
    eye = torch.eye(K, dtype=torch.bfloat16)
    kernel_w = torch._weight_int4pack_mm_for_cpu(eye, layer.packed, GROUP_SIZE, layer.scales_and_zeros)  # W^T
    assert torch.equal(layer.dequantize_t(torch.bfloat16), kernel_w)
    if native_bf16_gemm():  # both paths run: same weights, so only accumulation order differs
        x = torch.randn(200, K)
        with row_kinds(RowKind.PROMPT):
            gemm = layer(x)
        with row_kinds(RowKind.DECODE):
            kernel = layer(x)
        within_bf16(gemm, kernel, x, groups.dequantize(), eps=BF16_EPS)


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("kind", PATHS)
def test_int4_rows_in_a_tail_block_use_the_kernel_at_any_size(num_tokens, kind):
    groups = quantize_int4(torch.randn(96, K))  # 96 = 64 + a 32-row tail block, packed in another format
    layer = Int4Linear(pack_int4(groups, "cpu"))
    assert not layer.unpackable
    x = torch.randn(num_tokens, K)
    with row_kinds(kind):
        y = layer(x)
    within_bf16(y, F.linear(x, groups.dequantize()), x, groups.dequantize())


def test_int4_linear_bias_and_caller_dtype():
    groups = quantize_int4(torch.randn(32, 64))
    bias = torch.randn(32)
    layer = Int4Linear(pack_int4(groups, "cpu"), bias)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    w = groups.dequantize()
    within_bf16(y.float() - bias, F.linear(x.float(), w), x, w, eps=4 * BF16_EPS)


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("kind", PATHS)
def test_int8_linear_from_float_matches_dequantize_then_matmul(num_tokens, kind):
    w = torch.randn(N, K) * torch.rand(N, 1)
    rows = quantize_int8(w)
    assert ((rows.dequantize() - w).abs() <= rows.scales[:, None] / 2 + 1e-7).all()
    layer = Int8Linear(rows)
    x = torch.randn(num_tokens, K)
    with row_kinds(kind):
        y = layer(x)
    within_bf16(y, F.linear(x, rows.dequantize()), x, rows.dequantize())


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("kind", PATHS)
def test_q8_0_becomes_per_channel_int8_within_half_a_step(num_tokens, kind):
    t = gguf_tensor(Q8_0)
    rows = pack_weight(t, WeightFormat.INT8, "cpu")
    exact = t.dequantize()
    # one scale per row: its largest block is kept exactly, the others re-round by at most half a row step
    assert ((rows.dequantize() - exact).abs() <= rows.scales[:, None] / 2 + 1e-6).all()
    x = torch.randn(num_tokens, K)
    with row_kinds(kind):
        y = Int8Linear(rows)(x)
    within_bf16(y, F.linear(x, rows.dequantize()), x, exact)


def test_int8_embedding_dequantizes_only_looked_up_rows_exactly():
    rows = quantize_int8(torch.randn(50, 16))
    emb = Int8Embedding(rows)
    ids = torch.tensor([3, 0, 49, 3])
    assert torch.equal(emb(ids), rows.dequantize()[ids])
    assert emb.data.dtype == torch.int8 and not [b for b in emb.buffers() if b.is_floating_point() and b.dim() > 1]


def test_int4_rejects_shapes_the_kernel_cannot_take():
    from freehold.errors import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="K % 32"):
        pack_int4(quantize_int4(torch.randn(40, 64)), "cpu")
