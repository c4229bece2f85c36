"""Weight modes end to end: which tensors get packed, the module swap, and the default model loaded packed."""
import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from freehold.errors import InvalidRequestError
from freehold.kernels import native
from freehold.models.gguf_loader import GGUFTensor
from freehold.quant.convert import quantize_model
from freehold.quant.int4 import Int4Linear
from freehold.quant.bf16 import Bf16Embedding, Bf16Linear
from freehold.quant.int8 import Int8Embedding, Int8Linear
from freehold.quant.q8 import Q8Embedding, Q8Linear
from freehold.quant.modes import WeightFormat as F
from freehold.quant.modes import WeightMode as M
from freehold.quant.modes import check_float_mode, weight_format
from tests.conftest import TINY, tiny_model

PROMPT = [1, 4093, 314, 253, 1345, 28, 5, 600, 30, 2000]  # a short, arbitrary token sequence


def gguf(qtype, shape=(64, 64)):
    return GGUFTensor("t", qtype, shape, np.zeros(1, np.uint8))  # weight_format reads only type and shape


@pytest.mark.parametrize("name, source, mode, want", [
    ("model.layers.0.mlp.up_proj.weight", gguf(Q.Q4_1), M.AUTO, F.INT4),
    ("model.layers.0.mlp.up_proj.weight", gguf(Q.Q4_0), M.AUTO, F.INT4),
    ("model.layers.0.mlp.up_proj.weight", gguf(Q.Q6_K), M.AUTO, F.INT8),  # no kernel for it: int8, not fp32
    ("model.layers.0.mlp.up_proj.weight", gguf(Q.F16), M.AUTO, F.FLOAT),
    ("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 64), M.AUTO, F.FLOAT),
    ("model.layers.0.mlp.up_proj.weight", gguf(Q.Q4_1), M.FP32, F.FLOAT),
    ("model.layers.0.mlp.up_proj.weight", gguf(Q.Q4_1), M.INT8, F.INT8),
    ("model.layers.0.mlp.up_proj.weight", gguf(Q.F16), M.INT4, F.INT4),
    ("model.layers.0.mlp.up_proj.weight", gguf(Q.F16, (40, 64)), M.INT4, F.INT8),  # rows not a multiple of 16
    ("lm_head.weight", gguf(Q.F16, (256, 64)), M.INT4, F.INT8),  # the logits' matrix: 8 bits at least
    ("lm_head.weight", gguf(Q.Q4_0, (256, 64)), M.INT4, F.INT4),  # ... unless the file made it 4-bit
    ("model.embed_tokens.weight", gguf(Q.Q8_0), M.AUTO, F.Q8_0),  # no per-row re-rounding of a Q8_0 table
    ("lm_head.weight", gguf(Q.Q8_0, (256, 64)), M.AUTO, F.Q8_0),
    ("lm_head.weight", gguf(Q.Q6_K, (256, 64)), M.AUTO, F.BF16),  # other quantized tables: bf16
    ("model.embed_tokens.weight", gguf(Q.Q8_0), M.INT8, F.INT8),
    ("model.embed_tokens.weight", gguf(Q.Q4_0), M.INT4, F.INT8),  # lookups need rows: int8
    ("model.embed_tokens.weight", gguf(Q.F32), M.AUTO, F.FLOAT),
    ("model.layers.0.input_layernorm.weight", gguf(Q.F32, (64,)), M.INT4, F.FLOAT),
    ("model.layers.0.self_attn.q_proj.bias", torch.zeros(64), M.INT8, F.FLOAT),
])
def test_weight_format(name, source, mode, want):
    assert weight_format(name, source, mode, tied=False) is want


def test_tied_head_follows_the_embedding():
    assert weight_format("lm_head.weight", gguf(Q.Q8_0), M.INT8, tied=True) is F.FLOAT
    assert weight_format("lm_head.weight", gguf(Q.Q8_0), M.INT8, tied=False) is F.INT8


def test_float_modes_must_match_the_activation_dtype():
    check_float_mode(M.BF16, torch.bfloat16)
    check_float_mode(M.INT4, torch.float32)
    with pytest.raises(InvalidRequestError, match="weights=bf16"):
        check_float_mode(M.BF16, torch.float32)


@pytest.mark.parametrize("mode", [M.INT8, M.INT4])
@pytest.mark.parametrize("tied", [False, True])
def test_quantize_model_swaps_modules_and_stays_close(mode, tied):
    cfg = dataclasses.replace(TINY, tie_word_embeddings=tied)
    model = tiny_model(cfg=cfg)
    for p in model.parameters():  # realistic scale: weights ~ 1/sqrt(fan-in), so logits stay O(1)
        p.data.mul_(0.2)
    ids, pos = torch.tensor([5, 17, 3, 200, 9]), torch.arange(5)
    with torch.inference_mode():
        want = model.compute_logits(model(ids, pos))
        quantize_model(model, mode)
        got = model.compute_logits(model(ids, pos))
    linear = Int4Linear if mode is M.INT4 else Int8Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, linear)
    assert isinstance(model.model.embed_tokens, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert (model.lm_head.data is model.model.embed_tokens.data) == tied
    assert not [n for n, p in model.named_parameters() if p.dim() > 1]  # no float matrix left
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.15 if mode is M.INT4 else 0.03), rel


@pytest.fixture(scope="module")
def default_models(auto_llm, default_llm):
    """The session's loads (tests/conftest.py) of load_model(weights=AUTO) and load_model(weights=FP32): the tests
    below only read them."""
    return auto_llm.loaded, default_llm.loaded


def test_default_model_loads_packed(default_models):
    packed, dense = default_models
    m = packed.model
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[29].mlp
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # the 64-row-block layout joins: q/k/v, gate/up fused
        assert isinstance(attn.qkv_proj, Int4Linear) and attn.qkv_proj.out_features == 576 + 2 * 192
        assert isinstance(mlp.gate_up_proj, Int4Linear) and not hasattr(attn, "q_proj")
    else:
        assert isinstance(attn.q_proj, Int4Linear)
    assert isinstance(mlp.down_proj, Int4Linear)
    if native.q8_matmul() is not None:  # tied: one table, the file's Q8_0 blocks as stored
        assert isinstance(m.model.embed_tokens, Q8Embedding) and isinstance(m.lm_head, Q8Linear)
        assert m.lm_head.codes is m.model.embed_tokens.codes
    else:  # no kernel for it: the Q8_0 values as a bf16 table
        assert isinstance(m.model.embed_tokens, Bf16Embedding) and isinstance(m.lm_head, Bf16Linear)
        assert m.lm_head.table is m.model.embed_tokens.table
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # every N is a multiple of 64: prefill can dequantize
        assert all(mod.unpackable for mod in m.modules() if isinstance(mod, Int4Linear))
    assert packed.weight_bytes() < 0.25 * dense.weight_bytes()  # ~93 MiB (Q8_0 table; 119 as bf16) vs ~515 MiB
    assert isinstance(dense.model.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)


def test_default_model_int4_logits_match_the_dequantized_model(default_models):
    packed, dense = default_models
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        got = packed.model.compute_logits(packed.model(ids, torch.arange(len(ids))))
        want = dense.model.compute_logits(dense.model(ids, torch.arange(len(ids))))
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none")
    max_diff, max_kl = (got - want).abs().max().item(), kl.sum(-1).max().item()
    print(f"\nint4 (bf16 compute, int8 head) vs fp32: max |dlogit| {max_diff:.3f} of max |logit| "
          f"{want.abs().max():.1f}, max KL {max_kl:.2e}")
    # Q4_1 converts exactly; what remains is bf16 rounding and the per-channel int8 head (measured: 1.07, 6e-3)
    assert max_diff < 2.0 and max_kl < 0.02
    assert got[-1].argmax() == want[-1].argmax()
