"""The Llama family in plain PyTorch: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5 (attention bias),
Qwen3 (q/k RMSNorm). Module names follow Hugging Face so a safetensors state dict loads as is.

Shapes: T = tokens in the flat batch, H/KVH = query/KV heads, D = head dim, E = hidden size.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from freehold.config import ModelConfig
from freehold.kernels import native
from freehold.layers.attention import AttentionMetadata, KVCache, paged_attention
from freehold.layers.norm import RMSNorm
from freehold.layers.rotary import RopeTables, RotaryEmbedding
from freehold.models.native_layers import NativeLayers
from freehold.quant.compute import all_decode_rows, by_row_kind
from freehold.quant.int4 import Int4Linear


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.register_module("qkv_proj", None)  # [W_q; W_k; W_v] once freehold.models.fuse joins them
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, E] -> q, k, v heads side by side: [T, H + 2 KVH, D]."""
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return qkv.view(x.shape[0], self.num_heads + 2 * self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: KVCache | None,
                meta: AttentionMetadata | None) -> torch.Tensor:
        h, kvh = self.num_heads, self.num_kv_heads
        qkv = self.project(x)
        qk, v = qkv[:, :h + kvh], qkv[:, h + kvh:]  # [T, H + KVH, D], [T, KVH, D]
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])], dim=1)
        qk = rope.apply(qk)  # one rotation for the query and key heads together
        out = paged_attention(self.layer, qk[:, :h], qk[:, h:], v, cache, meta)  # [T, H, D]
        return self.o_proj(out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.register_module("gate_up_proj", None)  # [W_gate; W_up] once freehold.models.fuse joins them
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self._bf16_between_gemms(x):  # decode rows keep the fp32 route; prompt rows take the bf16 one
            return by_row_kind(x, self._fp32_route, self._bf16_route, scoped=True)
        return self._fp32_route(x)

    def _fp32_route(self, x: torch.Tensor) -> torch.Tensor:
        """Decode rows, and every row where the bf16 route does not apply: each projection in x's dtype."""
        return self.down_proj(swiglu(self.gate_up_proj(x)))

    def _bf16_between_gemms(self, x: torch.Tensor) -> bool:
        """Whether prompt rows can stay bf16 between the two GEMMs (_bf16_route): int4 on its GEMM path both,
        fp32 activations, the kernel built."""
        gate_up, down = self.gate_up_proj, self.down_proj
        return (x.dim() == 2 and x.dtype == torch.float32 and isinstance(gate_up, Int4Linear)
                and isinstance(down, Int4Linear) and gate_up.has_prompt_gemm(x) and down.has_prompt_gemm(x)
                and native.silu_mul_bf16() is not None)

    def _bf16_route(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt rows: gate/up's bf16 GEMM output into the bf16 SwiGLU kernel, its bf16 output into down's GEMM,
        which would round it to bf16 anyway: the bits of _fp32_route (NaN payloads aside), two conversion passes
        fewer."""
        gu = self.gate_up_proj.prompt_gemm(x).contiguous()
        h = gu.new_empty(gu.shape[0], gu.shape[1] // 2)
        native.silu_mul_bf16()(gu.data_ptr(), h.data_ptr(), h.shape[0], h.shape[1])
        return self.down_proj.prompt_gemm(h).to(x.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> silu(gate) * up [T, I]: the native kernel on CPU in fp32 (kernels/swiglu.c, also what
    kernels/decode_layers.c calls), else PyTorch's ops."""
    kernel = native.silu_mul() if gate_up.device.type == "cpu" and gate_up.dtype == torch.float32 else None
    if kernel is None or gate_up.dim() != 2:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    kernel(gate_up.data_ptr(), out.data_ptr(), out.shape[0], out.shape[1])
    return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeTables, cache: KVCache | None,
                meta: AttentionMetadata | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, not yet added to `residual`, the stream so far (None before layer 0).
        -> (this layer's MLP output, the stream before it): each norm adds its input to the stream first."""
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, rope, cache, meta)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # `_weight` skips the random init (weights are always loaded); on the meta device that init would import
        # torch._dynamo and triton (+130 MB resident) for nothing.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                    cfg.rope_scaling, rope_freq_factors)
        self.native_layers = True  # decode-only steps through kernels/decode_layers.c where it applies
        self._plans: weakref.WeakKeyDictionary[KVCache, NativeLayers | None] = weakref.WeakKeyDictionary()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, meta: AttentionMetadata | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, E] (call `compute_logits` on the rows you need)."""
        x = self.model.embed_tokens(input_ids).to(self.model.norm.weight.dtype)  # activations in the engine dtype
        rope = self.rope.tables(positions)  # cos / sin of these positions, shared by every layer
        plan = self.native_plan(cache) if meta is not None and meta.num_decode == len(input_ids) else None
        if plan is not None and x.dtype == torch.float32 and len(input_ids) and all_decode_rows():
            x, residual = plan.run(x, rope, meta)  # the same kernels as the loop below, without the Python between
        else:
            residual = None
            for layer in self.model.layers:
                x, residual = layer(x, residual, rope, cache, meta)
        return self.model.norm.add_and_norm(x, residual)[0]

    def native_plan(self, cache: KVCache | None) -> NativeLayers | None:
        """Every layer in one native call over `cache` (freehold.models.native_layers), or None where it does not
        apply or `native_layers` is off; built once per cache."""
        if cache is None or not self.native_layers:
            return None
        if cache not in self._plans:
            self._plans[cache] = NativeLayers.build(self, cache)
        return self._plans[cache]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, E] -> fp32 logits [N, V]."""
        return self.lm_head(hidden).float()
