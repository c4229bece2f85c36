"""Frozen, validated configuration: one dataclass per layer of the system."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from freehold.errors import InvalidRequestError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. Qwen2 adds `attention_bias`, Qwen3 adds `qk_norm`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    name: str = "model"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        """K and V for every layer: layers x 2 x kv_heads x (head_dim x bytes + scale bytes), where an int8
        cache adds one fp16 scale per token per head (quant/kv_int8.py) and a float cache none."""
        scale = KV_INT8_SCALE_BYTES if kv_dtype == torch.int8 else 0
        return self.num_layers * 2 * self.num_kv_heads * (self.head_dim * _dtype_bytes(kv_dtype) + scale)

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


KV_INT8_SCALE_BYTES = 2  # one fp16 scale per (token, KV head) in an int8 KV cache


class SpeculativeMode(enum.Enum):
    """`--speculative`: who proposes draft tokens for the target model to verify (freehold.spec)."""

    OFF = "off"
    NGRAM = "ngram"  # prompt lookup: the tokens that followed the last occurrence of the current suffix
    DRAFT = "draft"  # a draft model (same vocabulary; by default the target's own weights at int4) run greedily


MAX_SPECULATIVE_TOKENS = 16


class KVPolicy(enum.Enum):
    """`--kv-policy`: what a sequence keeps in the KV cache (freehold.kv.sink)."""

    FULL = "full"  # every token, up to the context length
    SINK = "sink"  # StreamingLLM: the first sink_tokens (whole blocks) and a sliding window of the last tokens


class KVDtype(enum.Enum):
    """What the KV cache stores (`--kv-dtype`). Attention always computes in the activation dtype."""

    # bf16 on CPU with fp32 activations where the native attention kernel runs (prompt rows then attend alone, so
    # bf16 rounding cannot turn chunk-dependent last bits into other tokens): half the bytes, a batch-64 decode step
    # ~15% shorter, ppl within 0.1% of fp32 (docs/performance.md, issue 19); elsewhere the activation dtype
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # per-token-per-head symmetric int8 with fp16 scales: half of bf16's bytes (+ 3% scales)

    def storage_dtype(self, activation: torch.dtype, device: str) -> torch.dtype:
        if self is KVDtype.AUTO:
            from freehold.kernels import native  # compiled once per process, on first use
            cpu_fp32 = activation == torch.float32 and torch.device(device).type == "cpu"
            return torch.bfloat16 if cpu_fp32 and native.paged_attention() is not None else activation
        return {KVDtype.FP32: torch.float32, KVDtype.BF16: torch.bfloat16, KVDtype.FP16: torch.float16,
                KVDtype.INT8: torch.int8}[self]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: device, dtypes, KV budget and scheduler limits."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kv_dtype: KVDtype = KVDtype.AUTO
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: `kv_cache_fraction` of free memory
    kv_cache_fraction: float = 0.25
    max_num_seqs: int = 64  # measured: 64 clients halve their TTFT p99 against 32 (docs/performance.md, issue 19)
    # measured against 512: 64 clients arriving together get +17-22% output tok/s and a 33-39% shorter TTFT p99 (fewer
    # steps, each with more prefill beside the decode rows), at the cost of longer decode stalls while such a burst
    # prefills (ITL p99 ~2.5-2.8 s vs ~1-1.6 s); 16 clients within the noise. A small KV pool fills faster at
    # admission, so its sequences preempt each other sooner (docs/performance.md, issue 19)
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    seed: int = 0
    speculative: SpeculativeMode = SpeculativeMode.OFF
    num_speculative_tokens: int = 8  # the most draft tokens a sequence proposes per step (adaptive below that)
    kv_policy: KVPolicy = KVPolicy.FULL  # the default of requests that do not set SamplingParams.kv_policy
    sink_tokens: int = 4  # kv_policy "sink": attention sinks, rounded up to whole blocks (4 -> one block)
    window: int = 2048  # kv_policy "sink": recent tokens kept, rounded up to whole blocks

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise InvalidRequestError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise InvalidRequestError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise InvalidRequestError(f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory}")
        if not isinstance(self.kv_dtype, KVDtype):
            raise InvalidRequestError(f"kv_dtype must be a KVDtype ({', '.join(d.value for d in KVDtype)}), "
                                      f"got {self.kv_dtype!r}", param="kv_dtype")
        if isinstance(self.speculative, str) and self.speculative in {m.value for m in SpeculativeMode}:
            object.__setattr__(self, "speculative", SpeculativeMode(self.speculative))  # LLM(speculative="ngram")
        if not isinstance(self.speculative, SpeculativeMode):
            raise InvalidRequestError(f"speculative must be one of {', '.join(m.value for m in SpeculativeMode)}, "
                                      f"got {self.speculative!r}", param="speculative")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                                      f"got {self.num_speculative_tokens}", param="num_speculative_tokens")
        if isinstance(self.kv_policy, str) and self.kv_policy in {p.value for p in KVPolicy}:
            object.__setattr__(self, "kv_policy", KVPolicy(self.kv_policy))  # LLM(kv_policy="sink")
        if not isinstance(self.kv_policy, KVPolicy):
            raise InvalidRequestError(f"kv_policy must be one of {', '.join(p.value for p in KVPolicy)}, "
                                      f"got {self.kv_policy!r}", param="kv_policy")
        if self.sink_tokens < 0:
            raise InvalidRequestError(f"sink_tokens must be >= 0, got {self.sink_tokens}", param="sink_tokens")
        if self.window < self.block_size:
            raise InvalidRequestError(f"window must hold at least one block of {self.block_size} tokens, "
                                      f"got {self.window}", param="window")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise InvalidRequestError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")

    @property
    def cache_dtype(self) -> torch.dtype:
        """The element dtype of the KV cache's storage (torch.int8 for an int8 cache)."""
        return self.kv_dtype.storage_dtype(self.dtype, self.device)
