"""Quantization as a module swap, in gpt-fast's two steps:
  1. make the quantized state: `pack_weight` turns each chosen tensor into `Int4Packed`, `Int8Rows`, `Q8Blocks`
     or a bf16 table on the target device (the final layout: nothing larger stays behind);
  2. convert the module: `swap_modules` replaces each `nn.Linear` / `nn.Embedding` by its packed twin.
`load_model` runs both on the raw file tensors, one tensor at a time (Q4_0/Q4_1 blocks are never dequantized);
`quantize_model` runs both on a model that already holds float weights.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from freehold.kernels import native
from freehold.models.gguf_loader import GGUFTensor
from freehold.quant.bf16 import Bf16Embedding, Bf16Linear
from freehold.quant.int4 import (GGUF_INT4_TYPES, Int4Linear, Int4Packed, int4_groups_from_gguf, pack_int4,
                                 quantize_int4)
from freehold.quant.int8 import Int8Embedding, Int8Linear, Int8Rows, quantize_int8
from freehold.quant.modes import EMBEDDING, WeightFormat, WeightMode, WeightSource, weight_format
from freehold.quant.q8 import Q8Blocks, Q8Embedding, Q8Linear, q8_blocks_from_gguf

PackedWeight = Int4Packed | Int8Rows | Q8Blocks | torch.Tensor  # a torch.Tensor: a bf16 table (WeightFormat.BF16)


def as_float(source: WeightSource, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return source.dequantize(dtype) if isinstance(source, GGUFTensor) else source.detach().to(dtype)


def pack_weight(source: WeightSource, fmt: WeightFormat, device: torch.device | str) -> PackedWeight:
    """Step 1 for one tensor. GGUF Q4_0/Q4_1 keep their codes (their scales are rounded to bf16: quant/int4.py);
    anything else is quantized from floats."""
    if fmt is WeightFormat.INT4:
        if isinstance(source, GGUFTensor) and source.qtype in GGUF_INT4_TYPES:
            return pack_int4(int4_groups_from_gguf(source), device)
        return pack_int4(quantize_int4(as_float(source)), device)
    if fmt is WeightFormat.INT8:
        return quantize_int8(as_float(source)).to(device)
    if fmt is WeightFormat.Q8_0 and torch.device(device).type == "cpu" and native.q8_matmul() is not None:
        return q8_blocks_from_gguf(source)
    if fmt in (WeightFormat.BF16, WeightFormat.Q8_0):  # Q8_0 off the CPU or without the kernel: a bf16 table
        return as_float(source, torch.bfloat16).to(device)
    raise ValueError(f"{fmt} is not a packed format")


def _packed_module(old: nn.Module, weight: PackedWeight) -> nn.Module:
    bias = old.bias.detach() if getattr(old, "bias", None) is not None else None  # on meta while loading
    if isinstance(weight, torch.Tensor):
        return Bf16Embedding(weight) if isinstance(old, nn.Embedding) else Bf16Linear(weight, bias)
    if isinstance(weight, Int4Packed):
        return Int4Linear(weight, bias)
    if isinstance(weight, Q8Blocks):
        return Q8Embedding(weight) if isinstance(old, nn.Embedding) else Q8Linear(weight, bias)
    if isinstance(old, nn.Embedding):
        return Int8Embedding(weight)
    return Int8Linear(weight, bias)


def swap_modules(model: nn.Module, packed: Mapping[str, PackedWeight]) -> None:
    """Step 2, in place: each `<module>.weight` in `packed` replaces `<module>`. With tied embeddings a packed
    embedding also becomes the LM head: one int8 table serves both the lookup and the logits."""
    for name, weight in packed.items():
        module_name = name.removesuffix(".weight")
        model.set_submodule(module_name, _packed_module(model.get_submodule(module_name), weight))
    embedding = model.get_submodule(EMBEDDING.removesuffix(".weight"))
    if model.config.tie_word_embeddings and isinstance(embedding, Int8Embedding):
        model.lm_head = Int8Linear(Int8Rows(embedding.data, embedding.scales))
    if model.config.tie_word_embeddings and isinstance(embedding, Bf16Embedding):
        model.lm_head = Bf16Linear(embedding.table)
    if model.config.tie_word_embeddings and isinstance(embedding, Q8Embedding):
        model.lm_head = Q8Linear(Q8Blocks(embedding.codes, embedding.scales))


def quantize_model(model: nn.Module, mode: WeightMode) -> nn.Module:
    """Quantize a float Llama-family model in place (a Hugging Face checkpoint, a test model ...)."""
    device = next(model.parameters()).device
    tied = model.config.tie_word_embeddings
    packed = {}
    for name, tensor in model.state_dict().items():
        fmt = weight_format(name, tensor, mode, tied)
        if fmt is not WeightFormat.FLOAT:
            packed[name] = pack_weight(tensor, fmt, device)
    swap_modules(model, packed)
    return model
