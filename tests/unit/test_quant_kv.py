"""Int8KVCache: a drop-in for KVCache whose round trip stays within half a quantization step."""
import pytest
import torch

from freehold.layers.attention import AttentionMetadata, KVCache, paged_attention
from freehold.config import KVDtype, ModelConfig
from freehold.quant.kv_int8 import Int8KVCache

LAYERS, BLOCKS, BLOCK, KVH, D = 2, 6, 4, 2, 16


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def both_caches(dtype=torch.float32):
    args = (LAYERS, BLOCKS, BLOCK, KVH, D)
    return KVCache(*args, dtype, "cpu"), Int8KVCache(*args, dtype, "cpu")


def test_round_trip_error_is_at_most_half_a_step():
    ref, cache = both_caches()
    k = torch.randn(9, KVH, D) * torch.rand(9, KVH, 1) * 10  # per-token, per-head magnitudes
    v = torch.randn(9, KVH, D)
    k[3, 1] = 0.0  # an all-zero head vector
    slots = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 12])  # blocks 1, 2 and the first slot of block 3
    for c in (ref, cache):
        c.write(1, slots, k, v)
    table = torch.tensor([1, 2, 3])
    (k8, v8), (kf, vf) = cache.gather(1, table, 9), ref.gather(1, table, 9)
    assert k8.dtype == torch.float32 and k8.shape == kf.shape == (9, KVH, D)
    for got, want in ((k8, kf), (v8, vf)):
        step = want.abs().amax(-1, keepdim=True) / 127  # one step per (token, head)
        assert ((got - want).abs() <= step / 2 * (1 + 2 ** -10) + 1e-7).all()
    assert torch.equal(k8[3, 1], torch.zeros(D))
    assert not torch.equal(k8, kf)  # it does quantize


def test_gather_returns_the_activation_dtype_for_batched_tables():
    _, cache = both_caches(torch.bfloat16)
    cache.write(0, torch.arange(8), torch.randn(8, KVH, D), torch.randn(8, KVH, D))
    k, v = cache.gather(0, torch.tensor([[0, 1], [1, 0]]), 6)
    assert k.dtype == v.dtype == torch.bfloat16 and k.shape == (2, 6, KVH, D)
    assert torch.equal(k[0, 4:6], k[1, 0:2])  # block 1 seen from both tables


def _config(layers, kv_heads, head_dim):
    return ModelConfig("llama", 100, kv_heads * head_dim, 64, layers, kv_heads, kv_heads, head_dim, 128)


def test_num_bytes_follows_the_per_token_formula():
    _, cache = both_caches()
    per_token = _config(LAYERS, KVH, D).kv_bytes_per_token(torch.int8)
    assert per_token == LAYERS * 2 * KVH * (D + 2)
    assert cache.num_bytes == per_token * BLOCKS * BLOCK
    assert _config(30, 3, 64).kv_bytes_per_token(torch.int8) == 11880  # SmolLM2-135M: about half of bf16's 23,040


def test_round_trip_is_what_gather_returns():
    ref, cache = both_caches()
    half = KVCache(LAYERS, BLOCKS, BLOCK, KVH, D, torch.bfloat16, "cpu")
    k, v = torch.randn(5, KVH, D), torch.randn(5, KVH, D)
    for c in (ref, cache, half):
        c.write(0, torch.arange(5), k, v)
        rk, rv = c.round_trip(k, v)
        gk, gv = c.gather(0, torch.tensor([0, 1]), 5)
        assert rk.dtype == torch.float32 and torch.equal(rk, gk) and torch.equal(rv, gv)
    assert ref.round_trip(k, v)[0] is k  # a cache in the activation dtype stores K/V exactly


def test_decode_attention_over_int8_cache_matches_float_cache():
    ref, cache = both_caches()
    heads, ctx = 4, 7
    k, v = torch.randn(ctx, KVH, D), torch.randn(ctx, KVH, D)
    table = torch.tensor([[2, 5]])
    slots = torch.tensor([8, 9, 10, 11, 20, 21, 22])
    for c in (ref, cache):
        c.write(0, slots[:-1], k[:-1], v[:-1])
    meta = AttentionMetadata(slots[-1:], 1, table, torch.tensor([ctx]), ())
    q = torch.randn(1, heads, D)
    out_ref = paged_attention(0, q, k[-1:], v[-1:], ref, meta)
    out = paged_attention(0, q, k[-1:], v[-1:], cache, meta)
    torch.testing.assert_close(out, out_ref, atol=0.05, rtol=0.0)
    assert (out - out_ref).abs().max() > 0  # the int8 cache was really used


def test_engine_decodes_through_an_int8_cache_like_a_full_recompute():
    from freehold.config import EngineConfig
    from freehold.engine.engine import Engine
    from freehold.types import SamplingParams
    from tests.conftest import TINY, TINY_EOS, tiny_model
    model = tiny_model()
    cache = Int8KVCache(TINY.num_layers, 64, 16, TINY.num_kv_heads, TINY.head_dim, torch.float32, "cpu")
    config = EngineConfig(kv_dtype=KVDtype.INT8, kv_cache_memory=64 * 16 * TINY.kv_bytes_per_token(torch.int8),
                          max_num_batched_tokens=32)
    engine = Engine(model, TINY, [TINY_EOS], config, kv_cache=cache)
    prompts = {str(i): [int(t) for t in torch.randint(0, TINY.vocab_size - 1, (5 + 17 * i,))] for i in range(3)}
    for rid, prompt in prompts.items():  # 5, 22 and 39 tokens: the longer ones prefill in chunks over the cache
        engine.add_request(rid, prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
    with torch.inference_mode():
        for rid, prompt in prompts.items():
            ids = list(prompt)
            for _ in range(12):
                ids.append(int(model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))[-1:]).argmax()))
            assert out[rid] == ids[len(prompt):], rid


@pytest.mark.parametrize("kv_dtype, storage", [("int8", torch.int8), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_kv_dtype_sets_the_cache_and_the_budget(kv_dtype, storage):
    """--kv-dtype picks the cache class and its bytes per token, so the same memory holds more tokens."""
    from freehold.config import KVDtype
    from freehold.types import SamplingParams
    from tests.conftest import TINY, tiny_engine
    memory = 64 * 16 * TINY.kv_bytes_per_token(torch.float32)
    fp32, engine = tiny_engine(kv_cache_memory=memory), tiny_engine(kv_cache_memory=memory, kv_dtype=KVDtype(kv_dtype))
    assert engine.budget.bytes_per_token == TINY.kv_bytes_per_token(storage)
    assert engine.runner.cache.k.dtype == storage
    assert isinstance(engine.runner.cache, Int8KVCache) == (storage == torch.int8)
    assert engine.runner.cache.num_bytes == engine.budget.num_bytes <= memory
    assert engine.budget.num_tokens >= (3.5 if storage == torch.int8 else 2) * fp32.budget.num_tokens
    for e in (fp32, engine):
        e.add_request("a", list(range(1, 40)), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    outs = []
    for e in (fp32, engine):
        tokens = []
        while e.has_unfinished():
            tokens += [t for o in e.step() for t in o.outputs[0].token_ids]
        e.check_integrity()
        outs.append(tokens)
    assert len(outs[1]) == 8 and outs[1][0] == outs[0][0]  # peaked logits: the rounded cache agrees at first


def test_kv_dtype_must_be_a_kv_dtype():
    from freehold.config import EngineConfig
    from freehold.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="kv_dtype must be a KVDtype"):
        EngineConfig(kv_dtype=torch.bfloat16)


@pytest.mark.parametrize("device, activation, kernel, want", [
    ("cpu", torch.float32, True, torch.bfloat16),  # the CPU default where the native attention kernel runs
    ("cpu", torch.float32, False, torch.float32),  # no kernel: prompt chunks would take SDPA, so no bf16 by default
    ("cpu", torch.bfloat16, True, torch.bfloat16),
    ("cuda", torch.float32, True, torch.float32),
    ("cuda", torch.float16, True, torch.float16)])
def test_auto_kv_dtype_is_bf16_only_on_cpu_with_fp32_activations_and_the_kernel(device, activation, kernel, want,
                                                                                monkeypatch):
    from freehold.kernels import native
    monkeypatch.setattr(native, "paged_attention", lambda: object() if kernel else None)
    assert KVDtype.AUTO.storage_dtype(activation, device) == want
    assert KVDtype.FP32.storage_dtype(activation, device) == torch.float32  # explicit dtypes stay what they say
