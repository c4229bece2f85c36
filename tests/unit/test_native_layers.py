"""Decode-only steps through kernels/decode_layers.c (freehold.models.native_layers) against the layer-by-layer path:
the same logits bit for bit, step by step, with several sequences, short prompts, draft runs, every KV element type
and a qkv bias; where the plan does not apply it is not built. The SwiGLU kernel both paths use, against its
definition, and the MLP's bf16 route on prompt rows (the bf16 kernel itself: tests/unit/test_native_ops.py). The
default model's int4 + bf16 KV configuration: tests/integration/test_default_weights.py."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from freehold.config import EngineConfig, KVDtype, SpeculativeMode
from freehold.engine.engine import Engine
from freehold.kernels import native
from freehold.models.fuse import fuse_projections
from freehold.models.llama import swiglu
from freehold.models.native_layers import NativeLayers
from freehold.quant.compute import RowKind, native_bf16_gemm, row_kinds
from freehold.quant.convert import quantize_model
from freehold.quant.modes import WeightMode
from freehold.types import SamplingParams
from tests.conftest import TINY, TINY_EOS, tiny_model

pytestmark = pytest.mark.skipif(native.decode_layers() is None or native.int4_matmul() is None,
                                reason="no C compiler or no AVX512-VNNI int4 kernel")

# int4 packs 64 output rows at a time: every projection (q, k, v apart before fusing) a multiple of 64. head_dim 64:
# the vector attention path, and with a bf16 cache its one-pass read of every KV head.
CFG = dataclasses.replace(TINY, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64)
PROMPTS = [[5, 17, 3, 200, 9], [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], list(range(40, 90)), [7] * 3]


def int4_model(cfg=CFG, seed=0):
    model = tiny_model(seed, cfg)
    for p in model.parameters():  # weights ~ 1/sqrt(fan-in): logits O(1), tokens that vary
        p.data.mul_(0.2)
    return fuse_projections(quantize_model(model, WeightMode.INT4))


def engine_for(model, **options) -> Engine:
    options.setdefault("kv_dtype", KVDtype.FP32)
    options.setdefault("kv_cache_memory", 64 * 16 * model.config.kv_bytes_per_token(torch.float32))
    return Engine(model, model.config, [TINY_EOS], EngineConfig(**options))


def logits_per_step(model, native_layers: bool, prompts, **options):
    """Greedy run of `prompts` on a fresh engine -> (every step's logits, the number of steps the plan ran, the
    number of draft runs verified)."""
    model.native_layers = native_layers
    engine = engine_for(model, **options)
    engine.speculator.costs.threshold = lambda *_: 0.01  # draft lengths from acceptance alone, not step timings
    seen, runs = [], [0]
    compute_logits, run = model.compute_logits, NativeLayers.run

    def counting_run(self, *args):
        runs[0] += 1
        return run(self, *args)

    model.compute_logits = lambda h: seen.append(compute_logits(h)) or seen[-1]
    NativeLayers.run = counting_run
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        while engine.has_unfinished():
            engine.step()
    finally:
        del model.compute_logits
        NativeLayers.run = run
    return seen, runs[0], engine.stats().num_verifications


@pytest.mark.parametrize("kv_dtype", [KVDtype.FP32, KVDtype.BF16, KVDtype.INT8])
@pytest.mark.parametrize("options", [{}, dict(speculative=SpeculativeMode.NGRAM, num_speculative_tokens=4)],
                         ids=["plain", "ngram"])
def test_decode_layers_give_the_layer_loops_logits(kv_dtype, options):
    model = int4_model()
    want, none, _ = logits_per_step(model, False, PROMPTS, kv_dtype=kv_dtype, **options)
    got, runs, drafted = logits_per_step(model, True, PROMPTS, kv_dtype=kv_dtype, **options)
    assert none == 0 and runs == len(got) > 10  # short prompts attend alone: every step is decode-only
    assert (drafted > 0) == bool(options)  # with n-gram drafts, runs of several rows per sequence
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_decode_layers_add_the_qkv_bias_and_leave_mixed_steps_to_the_loop():
    model = int4_model(dataclasses.replace(CFG, attention_bias=True))
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    long_prompt = [(i * 7) % 250 for i in range(300)]  # over GEMM_MIN_PROMPT_TOKENS: its rows are prompt rows
    want, _, _ = logits_per_step(model, False, PROMPTS[:2] + [long_prompt])
    got, runs, _ = logits_per_step(model, True, PROMPTS[:2] + [long_prompt])
    assert 0 < runs < len(got)  # the long prompt's chunk steps ran the loop
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_no_plan_where_a_layer_would_not_take_the_native_kernels():
    engine = engine_for(int4_model())
    assert NativeLayers.build(engine.runner.model, engine.runner.cache) is not None
    dense = tiny_model(cfg=CFG)  # fp32 weights: PyTorch's matmuls, not the int4 kernel
    assert NativeLayers.build(dense, engine_for(dense).runner.cache) is None
    qk_norm = int4_model(dataclasses.replace(CFG, qk_norm=True))
    assert NativeLayers.build(qk_norm, engine_for(qk_norm).runner.cache) is None


@pytest.mark.skipif(native.silu_mul() is None, reason="no C compiler")
@pytest.mark.parametrize("inter", [1536, 40])  # 40: a row's tail of 8 lanes
def test_swiglu_kernel_matches_the_definition_in_any_batch(inter):
    torch.manual_seed(0)
    gate_up = torch.randn(9, 2 * inter) * 4
    gate_up[0, :10] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, -1e30, float("inf"), float("-inf"),
                                     float("nan")])
    got = swiglu(gate_up)
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), F.silu(gate) * up, rtol=3e-7, atol=1e-30, equal_nan=True)
    g, u = gate_up[0, :4], gate_up[0, inter:inter + 4]
    assert got[0, :4].tolist() == [0.0, 0.0, (g[2] * u[2]).item(), 0.0]  # sigmoid(90) is 1, e^-90 below fp32's range
    assert got[0, 8].isnan() and got[0, 9].isnan()  # -inf * 0 and NaN, as torch.nn.functional.silu gives them
    bits = lambda t: t.view(torch.int32)  # noqa: E731  (NaN compares unequal; its bits do not)
    assert all(torch.equal(bits(swiglu(gate_up[i:i + 1])), bits(got[i:i + 1])) for i in range(9))  # a row alone


@pytest.mark.skipif(native.silu_mul_bf16() is None or not native_bf16_gemm(), reason="prompt rows take the kernels")
def test_prompt_rows_keep_bf16_between_the_mlp_gemms_with_the_fp32_routes_bits(monkeypatch):
    """Prompt rows on int4's GEMM path go gate/up GEMM -> bf16 SwiGLU -> down GEMM without fp32 in between (llama.MLP),
    also beside decode rows in a mixed batch: the same bits as gate_up -> fp32 SwiGLU -> down, which rounds its input
    to bf16 anyway. Decode rows keep the fp32 route."""
    mlp = int4_model().model.layers[1].mlp
    calls = []
    kernel = native.silu_mul_bf16()
    monkeypatch.setattr(native, "silu_mul_bf16", lambda: lambda *a: calls.append(a[2]) or kernel(*a))
    torch.manual_seed(2)
    x = torch.randn(37, CFG.hidden_size) * 3
    bits = lambda t: t.view(torch.int32)  # noqa: E731
    mask = torch.zeros(37, dtype=torch.bool)
    mask[:5] = mask[30:] = True  # decode rows on both sides of a prompt chunk
    for kinds, bf16_rows in ((None, [37]), (RowKind.PROMPT, [37]), (RowKind.DECODE, []), (mask, [25])):
        calls.clear()
        with contextlib.nullcontext() if kinds is None else row_kinds(kinds):
            got = mlp(x)
            fp32_route = mlp.down_proj(swiglu(mlp.gate_up_proj(x)))
        assert calls == bf16_rows
        assert got.dtype == torch.float32 and torch.equal(bits(got), bits(fp32_route))
