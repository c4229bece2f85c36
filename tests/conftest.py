"""Fixtures shared by every tier: the default model (always installed), a tiny random Llama for fast unit tests."""
from __future__ import annotations

import pytest
import torch

from freehold.config import EngineConfig, KVDtype, ModelConfig
from freehold.engine.engine import Engine
from freehold.models.llama import LlamaForCausalLM
from freehold.models.locate import default_model_path

TINY = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=10000.0,
                   name="tiny")
TINY_EOS = 255


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # large weights: peaked, well-separated logits
    return model.eval()


def tiny_engine(model: LlamaForCausalLM | None = None, **options) -> Engine:
    """An fp32 KV cache unless told otherwise: these tests compare against the model's own fp32 forward."""
    options.setdefault("kv_dtype", KVDtype.FP32)
    per_token = TINY.kv_bytes_per_token(options["kv_dtype"].storage_dtype(torch.float32, "cpu"))
    options.setdefault("kv_cache_memory", 64 * per_token * 16)  # 64 blocks
    return Engine(model or tiny_model(), TINY, [TINY_EOS], EngineConfig(**options))


@pytest.fixture(scope="session")
def default_model_file():
    return default_model_path()


@pytest.fixture(scope="session")
def default_llm():
    """fp32 weights and KV cache: the reference-parity configuration (quantized kernels are tested in
    tests/unit/test_quant*, the default int4 + bf16 KV configuration in tests/integration/test_quant_accuracy.py)."""
    from freehold.llm import LLM
    from freehold.quant.modes import WeightMode
    return LLM(progress=False, kv_cache_memory=256 << 20, weights=WeightMode.FP32, kv_dtype=KVDtype.FP32)


@pytest.fixture(scope="session")
def auto_llm():
    """The default configuration (weights auto: int4 layers and the Q8_0 table; bf16 KV cache on CPU), as a user
    gets it; one load shared by the integration tests of the defaults."""
    from freehold.llm import LLM
    return LLM(progress=False, kv_cache_memory=256 << 20)


@pytest.fixture(scope="module")
def tokenizer(default_model_file):
    """The default model's tokenizer (a module may define its own `tokenizer` fixture instead)."""
    from freehold.tokenizer import Tokenizer
    return Tokenizer.from_model_path(default_model_file)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    """A fresh constraint compiler (empty cache) per test module, for the default model's vocabulary."""
    from freehold.constrain.compiler import ConstraintCompiler
    return ConstraintCompiler(tokenizer, 49152)
