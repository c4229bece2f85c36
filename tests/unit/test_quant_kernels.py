"""Freehold's matmul kernels (kernels/quant_matmul.c) against float64 references of the same weights, row
independence (a row's result never depends on the batch), and the fused projections built from them."""
import pytest
import torch

from freehold.kernels import native
from freehold.models.fuse import concat_linears, fuse_projections
from freehold.quant.bf16 import Bf16Linear, native_bf16_matmul
from freehold.quant.compute import RowKind, row_kinds
from freehold.quant.convert import quantize_model
from freehold.quant.int4 import Int4Linear, native_int4_matmul, pack_int4, quantize_int4
from freehold.quant.int8 import Int8Linear, quantize_int8
from freehold.quant.modes import WeightMode
from freehold.quant.q8 import Q8Embedding, Q8Linear, native_q8_matmul, q8_blocks_from_gguf
from tests.conftest import tiny_model

FP32_EPS = 2.0 ** -24
ROWS = (1, 2, 5, 64)  # one decode token, small batches, a prefill chunk


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def within_fp32(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor, terms: int) -> None:
    """|y - ref| <= terms * eps32 * (|x| |w|^T): the bound of an fp32 dot product of `terms` roundings, not bf16's
    (2^-9, 30000x looser)."""
    bound = terms * FP32_EPS * (x.abs().double() @ w.abs().double().T)
    excess = ((y.double() - ref).abs() / (bound + 1e-30)).max().item()
    assert excess <= 1.0, f"error {excess:.2f}x the fp32 bound"


@pytest.mark.skipif(native.int4_matmul() is None, reason="no C compiler or no AVX512-VNNI: PyTorch's kernel is used")
@pytest.mark.parametrize("m", ROWS)
def test_int4_kernel_is_exact_to_fp32(m):
    n, k = 192, 320  # three 64-row blocks, ten groups
    layer = Int4Linear(pack_int4(quantize_int4(torch.randn(n, k)), "cpu"))
    assert layer.unpackable
    w = layer.dequantize()  # what the codes and (bf16) scales mean, in fp32
    x = torch.randn(m, k) * torch.logspace(-3, 3, k)  # groups with very different magnitudes
    y = native_int4_matmul(x, layer.packed, layer.scales_and_zeros, n)
    within_fp32(y, x.double() @ w.double().T, x, w, terms=k)
    with row_kinds(RowKind.DECODE):
        assert torch.equal(layer(x), y)  # the layer takes this path for decode rows


@pytest.mark.skipif(native.int4_matmul() is None, reason="no C compiler or no AVX512-VNNI: PyTorch's kernel is used")
def test_int4_kernel_rows_do_not_depend_on_the_batch():
    layer = Int4Linear(pack_int4(quantize_int4(torch.randn(128, 256)), "cpu"))
    x = torch.randn(37, 256)
    together = native_int4_matmul(x, layer.packed, layer.scales_and_zeros, 128)
    for i in (0, 5, 36):
        assert torch.equal(native_int4_matmul(x[i:i + 1], layer.packed, layer.scales_and_zeros, 128)[0], together[i])


def test_int4_kernel_handles_zero_and_huge_groups():
    if native.int4_matmul() is None:
        pytest.skip("no native int4 kernel")
    layer = Int4Linear(pack_int4(quantize_int4(torch.randn(64, 96)), "cpu"))
    x = torch.randn(2, 96)
    x[0, :32] = 0  # an all-zero group has no exponent
    x[1, 32:64] *= 1e30
    w = layer.dequantize()
    y = native_int4_matmul(x, layer.packed, layer.scales_and_zeros, 64)
    within_fp32(y, x.double() @ w.double().T, x, w, terms=96)


@pytest.mark.skipif(native.int4_dequantize_t() is None, reason="no C compiler: torch ops rebuild W^T")
@pytest.mark.parametrize("shape", [(960, 576), (576, 576), (3072, 576), (576, 1536), (64, 32)])
def test_int4_weight_rebuilt_for_prompt_rows_is_the_torch_ops_bit_for_bit(shape, monkeypatch):
    """Prompt rows multiply by W^T rebuilt in bf16 for each call; the native rebuild gives the torch ops' bits
    (the default model's shapes, and a group of huge, zero and tiny weights)."""
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    w[0, :32] = torch.tensor([1e30, -1e30, 0.0, 1e-30] * 8)
    w[1, :32] = 0.0  # a constant group: scale 0
    w[2, :32] = torch.linspace(-1e-39, 1e-39, 32)  # subnormal scale and min
    layer = Int4Linear(pack_int4(quantize_int4(w), "cpu"))
    if not layer.unpackable:
        pytest.skip("torch packs int4 in another layout on this CPU: prompt rows use its kernel, nothing is rebuilt")
    rebuilt = layer.dequantize_t(torch.bfloat16)
    direct = torch.empty(shape[1], shape[0], dtype=torch.bfloat16)  # the kernel itself ran (no silent fallback)
    assert native.int4_dequantize_t()(layer.packed.data_ptr(), layer.scales_and_zeros.data_ptr(), direct.data_ptr(),
                                      *shape) == 0
    assert torch.equal(direct.view(torch.int16), rebuilt.view(torch.int16))
    monkeypatch.setattr(native, "int4_dequantize_t", lambda: None)  # the torch ops
    by_torch = layer.dequantize_t(torch.bfloat16)
    assert torch.equal(rebuilt.view(torch.int16), by_torch.view(torch.int16))
    assert torch.equal(rebuilt.float().T, layer.dequantize().to(torch.bfloat16).float())  # and what the kernel uses


@pytest.mark.skipif(native.bf16_matmul() is None, reason="no C compiler: PyTorch's GEMM is used")
@pytest.mark.parametrize("m", ROWS)
def test_bf16_kernel_is_exact_to_fp32_given_bf16_inputs(m):
    n, k = 100, 200  # neither a multiple of the kernel's 4-row or 32-column steps
    table = torch.randn(n, k).bfloat16()
    x = torch.randn(m, k).bfloat16()
    y = native_bf16_matmul(x, table)
    within_fp32(y, x.double() @ table.double().T, x, table, terms=k)
    assert torch.equal(y[m - 1], native_bf16_matmul(x[m - 1:], table)[0])  # rows are independent
    with row_kinds(RowKind.DECODE):
        assert torch.equal(Bf16Linear(table)(x.float()), y)


@pytest.mark.parametrize("kind", ["int4", "int8", "bf16", "float"])
def test_concatenated_projection_equals_its_parts(kind):
    weights = [torch.randn(n, 128) for n in (128, 64, 64)]
    if kind == "int4":
        parts = [Int4Linear(pack_int4(quantize_int4(w), "cpu")) for w in weights]
    elif kind == "int8":
        parts = [Int8Linear(quantize_int8(w)) for w in weights]
    elif kind == "bf16":
        parts = [Bf16Linear(w) for w in weights]
    else:
        parts = [torch.nn.Linear(128, w.shape[0], bias=True) for w in weights]
    fused = concat_linears(parts)
    if kind == "int4" and not all(p.unpackable for p in parts):
        assert fused is None  # only the 64-row CPU layout is known to join
        return
    x = torch.randn(3, 128)
    with torch.inference_mode():
        want = torch.cat([p(x) for p in parts], dim=-1)
        got = fused(x)
    if kind == "float":  # a different GEMM shape may sum in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


def test_parts_of_different_formats_stay_separate():
    parts = [Int8Linear(quantize_int8(torch.randn(64, 64))), Bf16Linear(torch.randn(64, 64))]
    assert concat_linears(parts) is None


@pytest.mark.parametrize("mode", [WeightMode.FP32, WeightMode.INT8, WeightMode.INT4])
def test_fused_model_computes_what_the_unfused_one_does(mode):
    model = tiny_model(1)
    if mode is not WeightMode.FP32:
        quantize_model(model, mode)
    ids, pos = torch.tensor([3, 17, 4, 99, 250, 8]), torch.arange(6)
    with torch.inference_mode():
        want = model.compute_logits(model(ids, pos))
        fuse_projections(model)
        got = model.compute_logits(model(ids, pos))
    assert model.model.layers[0].mlp.gate_up_proj is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(native.q8_matmul() is None, reason="no C compiler: a Q8_0 table is held as bf16")
@pytest.mark.parametrize("m", ROWS + (6, 11))  # 4 x 4 passes below 6 rows of x, 6 x 3 from 6 on (11: a 5-row tail)
def test_q8_0_kernel_is_exact_to_fp32(m):
    t = gguf_q8_0(101, 256)  # 101 rows: a tail in both kinds of pass (3 or 4 table rows at a time)
    blocks = q8_blocks_from_gguf(t)
    w = t.dequantize()  # the gguf package's reading of the same blocks
    assert torch.equal(blocks.dequantize(), w)
    x = torch.randn(m, 256)
    y = native_q8_matmul(x, blocks)
    within_fp32(y, x.double() @ w.double().T, x, w, terms=256 + 8)
    for i in sorted({0, m // 2, m - 1}):  # rows are independent (a 6-row pass, its tail, a row alone)
        assert torch.equal(y[i], native_q8_matmul(x[i:i + 1], blocks)[0])
    head, emb = Q8Linear(blocks), Q8Embedding(blocks)
    with row_kinds(RowKind.DECODE):
        assert torch.equal(head(x), y)
    ids = torch.tensor([7, 0, 99, 7])
    assert torch.equal(emb(ids), w[ids])
    with row_kinds(RowKind.PROMPT):  # prompt rows: the bf16 GEMM path (x and w rounded to bf16)
        assert ((head(x) - x @ w.T).abs() <= 2 * 2.0 ** -8 * (x.abs() @ w.abs().T)).all()


def gguf_q8_0(n: int, k: int):
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from freehold.models.gguf_loader import GGUFTensor
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    q = GGMLQuantizationType.Q8_0
    return GGUFTensor("t", q, (n, k), quantize(w, q))


@pytest.mark.parametrize("m", ROWS)
def test_pytorch_int8_kernel_is_exact_to_fp32_with_fp32_inputs(m):
    """The int8 layers' kernel: in fp32 it computes dequantize-then-matmul (the layers feed it bf16 for speed)."""
    rows = quantize_int8(torch.randn(96, 256))
    w = rows.dequantize()
    x = torch.randn(m, 256)
    y = torch._weight_int8pack_mm(x, rows.data, rows.scales)
    within_fp32(y, x.double() @ w.double().T, x, w, terms=256 + 2)
