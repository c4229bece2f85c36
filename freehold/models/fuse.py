"""Projections that read the same input become one matrix: q/k/v -> qkv_proj, gate/up -> gate_up_proj.

    [y_q | y_k | y_v] = x [W_q; W_k; W_v]^T
Each output row is computed exactly as before (rows of a product are independent); decode runs 2 matmuls per
layer fewer, and one fused call reads x once. Layers whose parts differ in format (a GGUF can store q and v in
different quantizations) or whose packed layout cannot be joined stay separate.
"""
from __future__ import annotations

import torch
from torch import nn

from freehold.quant.bf16 import Bf16Linear
from freehold.quant.int4 import Int4Linear
from freehold.quant.int8 import Int8Linear


def concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One module computing the layers' outputs side by side, or None where they cannot be joined."""
    kind = type(layers[0])
    if any(type(layer) is not kind for layer in layers) or any(
            getattr(layer, "bias", None) is not None and layer.bias.is_meta for layer in layers):
        return None
    bias = _concat_bias(layers)
    if kind is nn.Linear:
        weight = torch.cat([layer.weight.detach() for layer in layers])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    if kind in (Int4Linear, Int8Linear, Bf16Linear):
        return kind.concat(layers, bias)
    return None


def _concat_bias(layers: list[nn.Module]) -> torch.Tensor | None:
    biases = [getattr(layer, "bias", None) for layer in layers]
    if all(b is None for b in biases):
        return None
    like = next(b for b in biases if b is not None)
    return torch.cat([b.detach() if b is not None else like.new_zeros(layer.out_features)
                      for b, layer in zip(biases, layers)])


def fuse_projections(model: nn.Module) -> nn.Module:
    """In place, for every decoder layer of a Llama-family model; returns the model."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
        gate_up = concat_linears([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
    return model
