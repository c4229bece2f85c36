"""What quantization costs in accuracy, on the default model and the pydoc text (4 windows of 1,024 tokens;
`freehold bench quant` runs the full 32,768): int4 from the GGUF's Q4_1 within 0.1% of the dequantized-fp32
perplexity, int8 weights within 1%, an int8 KV cache within 1% of the fp32 one, a bf16 cache (the CPU default) within
0.1%, and the default configuration (int4 weights, bf16 cache) within 0.2%."""
import pytest
import torch

from freehold.config import EngineConfig, KVDtype
from freehold.engine.memory import create_kv_cache
from freehold.eval.ppl import default_text, perplexity
from freehold.models.loader import load_model
from freehold.quant.modes import WeightMode

TOKENS, WINDOW = 4096, 1024


@pytest.fixture(scope="module")
def ids(default_llm):
    return default_llm.tokenizer.encode(default_text(), add_special_tokens=False)[:TOKENS]


@pytest.fixture(scope="module")
def fp32_ppl(default_llm, ids):
    return perplexity(default_llm.loaded.model, ids, WINDOW, TOKENS).perplexity


@pytest.fixture(scope="module")
def load(auto_llm):
    """Each weight mode's model loaded once for the module; AUTO is the session's load_model(weights=AUTO)
    (tests/conftest.py), which these tests only read."""
    models = {WeightMode.AUTO: auto_llm.loaded}

    def get(mode: WeightMode):
        if mode not in models:
            models[mode] = load_model(None, weights=mode, progress=False)
        return models[mode]
    return get


def relative(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize("mode, tolerance", [(WeightMode.AUTO, 0.001), (WeightMode.INT8, 0.01)])
def test_quantized_weights_keep_perplexity(load, ids, fp32_ppl, mode, tolerance):
    model = load(mode).model
    ppl = perplexity(model, ids, WINDOW, TOKENS).perplexity
    assert relative(ppl, fp32_ppl) < tolerance, (mode, ppl, fp32_ppl)
    assert ppl != fp32_ppl  # the packed kernels really ran


@pytest.mark.parametrize("kv_dtype, tolerance", [(KVDtype.INT8, 0.01), (KVDtype.BF16, 0.001)])
def test_quantized_kv_cache_keeps_perplexity(default_llm, ids, fp32_ppl, kv_dtype, tolerance):
    model = default_llm.loaded.model
    config = EngineConfig(kv_dtype=kv_dtype)
    cache = create_kv_cache(default_llm.loaded.config, config, num_blocks=WINDOW // config.block_size)
    fp32_config = EngineConfig(kv_dtype=KVDtype.FP32)
    assert cache.num_bytes < create_kv_cache(default_llm.loaded.config, fp32_config, WINDOW // 16).num_bytes
    ppl = perplexity(model, ids, WINDOW, TOKENS, cache=cache).perplexity
    assert relative(ppl, fp32_ppl) < tolerance, (kv_dtype, ppl, fp32_ppl)
    assert ppl != fp32_ppl  # attention read the rounded K/V


def test_default_configuration_keeps_perplexity(load, ids, fp32_ppl):
    """What `freehold serve` runs on CPU by default: the GGUF's int4 weights and a bf16 KV cache."""
    loaded = load(WeightMode.AUTO)
    config = EngineConfig()
    assert config.cache_dtype == torch.bfloat16
    cache = create_kv_cache(loaded.config, config, num_blocks=WINDOW // config.block_size)
    ppl = perplexity(loaded.model, ids, WINDOW, TOKENS, cache=cache).perplexity
    assert relative(ppl, fp32_ppl) < 0.002, (ppl, fp32_ppl)


def test_fp32_kv_cache_path_is_exact(default_llm, ids):
    """Through an fp32 cache a window is scored exactly as without one: the cache path adds no error of its own."""
    model = default_llm.loaded.model
    cache = create_kv_cache(default_llm.loaded.config, EngineConfig(kv_dtype=KVDtype.FP32), WINDOW // 16)
    with torch.inference_mode():
        assert perplexity(model, ids, WINDOW, WINDOW, cache=cache) == perplexity(model, ids, WINDOW, WINDOW)
