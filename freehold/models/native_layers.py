"""Every decoder layer of a decode-only step in one native call (kernels/decode_layers.c).

At batch 1 a layer is ~10 kernel calls, each cheap, and the Python between them (module dispatch, argument checks,
output allocation, ctypes conversions) cost about as much as the kernels themselves: half of a default-model decode
step on a 2-core machine (docs/performance.md, issue 19). The C driver calls the same kernels (int4 matmul,
add + RMSNorm, RoPE, paged attention, SwiGLU) through their addresses, in the order `DecoderLayer.forward` does, on
the same values: each row gets the same bits either way (tests/unit/test_native_layers.py compares them).

It runs where the layer-by-layer path would take those kernels for every row: CPU, fp32 activations, every
projection an int4 layer in the native kernel's layout (fused qkv and gate/up, no bias except on qkv), no q/k norm,
a KV cache the native attention reads, and a step whose rows are all decode rows attending alone
(`meta.num_decode` == T: decoded tokens, draft tokens, short prompts). Anything else (a long prompt's rows, other
weight formats, CUDA) keeps the Python layers. The plan holds the weights' and the cache's addresses: it is built
once per cache (`LlamaForCausalLM.native_plan`) and holds an alias of every tensor it points to (memory-safe), but
it computes with the weights it was built on: it assumes the model's modules and parameters are not replaced
afterwards. A kernel failure inside the call (out of memory) raises, failing the step, where the layer loop's int4
layer would fall back to PyTorch's kernel.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from freehold.kernels import checks, native
from freehold.layers.attention import AttentionMetadata, KVCache, NativeKV
from freehold.layers.rotary import RopeTables
from freehold.quant.int4 import Int4Linear

_P, _F, _I, _I64 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_int64


class _Kernels(ctypes.Structure):
    _fields_ = [("int4", _P), ("norm", _P), ("rope", _P), ("silu_mul", _P), ("attention", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("w_in", "w_post", "qkv", "qkv_sz", "o", "o_sz", "gate_up", "gate_up_sz",
                                        "down", "down_sz", "qkv_bias", "k_cache", "v_cache", "k_scales", "v_scales")]


class _Dims(ctypes.Structure):
    _fields_ = [("hidden", _I64), ("inter", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64),
                ("eps", _F), ("scale", _F), ("kv_dtype", _I), ("block_size", _I)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _I64), ("cos", _P), ("sin", _P), ("block_tables", _P), ("context_lens", _P), ("slots", _P),
                ("runs", _P), ("max_blocks", _I), ("num_runs", _I),
                *((name, _P) for name in ("h", "qkv", "qk", "q", "attn", "gu", "act"))]


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _int4(module) -> Int4Linear | None:
    """The module when the native int4 kernel would multiply every decode row of it, else None."""
    if type(module) is not Int4Linear or not module.unpackable:
        return None
    return module


@dataclass
class NativeLayers:
    fn: object  # decode_layers
    kernels: _Kernels
    layers: ctypes.Array  # of _Layer, one per decoder layer
    dims: _Dims
    view: NativeKV  # layer 0's cache, for the step's argument checks (every layer's has the same shape)
    held: list[torch.Tensor]  # every tensor whose address the plan holds (not the cache object: plans are kept
    # per cache in a weak dictionary, LlamaForCausalLM.native_plan)

    @classmethod
    def build(cls, model, cache: KVCache) -> NativeLayers | None:
        """The plan for `model` (a LlamaForCausalLM) over `cache`, or None where some layer would not take the
        native kernels (see the module docstring)."""
        cfg, body = model.config, model.model
        fns = (native.int4_matmul(), native.add_rms_norm(), native.rope(), native.silu_mul(),
               native.paged_attention(), native.decode_layers())
        if any(f is None for f in fns) or body.norm.weight.device.type != "cpu" or not len(body.layers):
            return None
        eps = body.layers[0].input_layernorm.eps
        e, i, h, kvh, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        layers, held = [], []
        for index, layer in enumerate(body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, o = _int4(attn.qkv_proj), _int4(attn.o_proj)
            gate_up, down = _int4(mlp.gate_up_proj), _int4(mlp.down_proj)
            view = cache.native_view(index)
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if (None in (qkv, o, gate_up, down, view) or attn.q_norm is not None
                    or any(w.dtype != torch.float32 or not w.is_contiguous() or w.shape != (e,) for w in norms)
                    or {layer.input_layernorm.eps, layer.post_attention_layernorm.eps} != {eps}
                    or (qkv.in_features, qkv.out_features) != (e, (h + 2 * kvh) * d)
                    or (o.in_features, o.out_features) != (h * d, e)
                    or (gate_up.in_features, gate_up.out_features) != (e, 2 * i)
                    or (down.in_features, down.out_features) != (i, e)
                    or any(m.bias is not None for m in (o, gate_up, down))):
                return None
            bias = qkv.bias
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                return None
            tensors = [*norms, qkv.packed, qkv.scales_and_zeros, o.packed, o.scales_and_zeros, gate_up.packed,
                       gate_up.scales_and_zeros, down.packed, down.scales_and_zeros, bias, view.k, view.v,
                       view.k_scales, view.v_scales]
            tensors = [t.detach() if t is not None else None for t in tensors]  # the storage, whatever `.data` becomes
            held += [t for t in tensors if t is not None]
            layers.append(_Layer(*(_ptr(t) for t in tensors)))
        kernels = _Kernels(*(native.address(f) for f in fns[:5]))
        dims = _Dims(e, i, h, kvh, d, eps, d ** -0.5, cache.native_view(0).code,
                     cache.block_size)
        return cls(fns[5], kernels, (_Layer * len(layers))(*layers), dims, cache.native_view(0), held)

    def run(self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, E] fp32 (the embeddings; overwritten) -> (the last layer's output, the residual stream), as the
        layers' loop in LlamaForCausalLM.forward returns them."""
        dims, t = self.dims, x.shape[0]
        e, hd, heads, kvh = dims.hidden, dims.head_dim, dims.heads, dims.kv_heads
        x = x.contiguous()
        residual = torch.empty_like(x)
        bufs = [torch.empty(t, w) for w in (e, (heads + 2 * kvh) * hd, (heads + kvh) * hd, heads * hd, heads * hd,
                                            2 * dims.inter, dims.inter)]
        qkv, qk = bufs[1].view(t, -1, hd), bufs[2].view(t, -1, hd)
        tables, lens = meta.decode_block_tables.contiguous(), meta.decode_context_lens.contiguous()
        slots = meta.slot_mapping.contiguous()
        runs = meta.decode_runs.contiguous() if meta.decode_runs is not None else None
        checks.rope_operands(qk, rope.cos)
        checks.paged_decode_step(self.view, bufs[3].view(t, heads, hd),
                                 (qk[:, heads:], qkv[:, heads + kvh:]), tables, lens, slots, runs)
        step = _Step(t, rope.cos.data_ptr(), rope.sin.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                     slots.data_ptr(), _ptr(runs), tables.shape[1], runs.shape[0] - 1 if runs is not None else 0,
                     *(b.data_ptr() for b in bufs))
        status = self.fn(ctypes.byref(self.kernels), self.layers, len(self.layers), ctypes.byref(self.dims),
                         ctypes.byref(step), x.data_ptr(), residual.data_ptr())
        if status:
            layer, at, code = status // 1000, status % 1000 // 100, status % 100
            raise RuntimeError(f"native decode layers: kernel {at} of layer {layer} failed (status {code})")
        return x, residual
