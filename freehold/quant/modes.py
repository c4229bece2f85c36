"""Which weights stay packed: the user's `WeightMode`, and the per-tensor `WeightFormat` it implies.

Only the matrices of linear layers and the token embedding are ever packed; norms, biases and rope tables stay
float in the activation dtype. A packed embedding is int8 (a lookup must dequantize single rows; the int4
kernels' layout is opaque), except that AUTO keeps a GGUF's quantized embedding or LM head: Q8_0 as stored
(quant/q8.py), other types as a bf16 table (quant/bf16.py); re-quantizing it per row would cost accuracy.
A tied LM head follows the embedding.
"""
from __future__ import annotations

import enum

import torch
from gguf import GGMLQuantizationType

from freehold.errors import InvalidRequestError
from freehold.models.gguf_loader import GGUFTensor
from freehold.quant.int4 import GGUF_INT4_TYPES, can_int4

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

WeightSource = GGUFTensor | torch.Tensor  # raw GGUF rows, or a float tensor (Hugging Face file, live module)


class WeightMode(enum.Enum):
    """How `load_model` holds linear and embedding weights."""

    AUTO = "auto"  # GGUF: keep the file's quantization (Q4_0/Q4_1 -> int4, other quantized types -> int8);
    #                float tensors (and Hugging Face directories) stay float in the activation dtype
    FP32 = "fp32"  # every weight float32: no quantization (the loader's original behaviour)
    BF16 = "bf16"  # every weight bfloat16: no quantization
    INT8 = "int8"  # linear layers and the embedding per-channel int8, quantized on load where needed
    INT4 = "int4"  # linear layers group-wise int4 (Q4_0/Q4_1 keep their codes, scales rounded to bf16); embedding
    #                and LM head int8 unless the file stores the LM head in Q4_0/Q4_1 itself

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The dtype of every weight for the float modes; None where weights are packed."""
        return {WeightMode.FP32: torch.float32, WeightMode.BF16: torch.bfloat16}.get(self)


class WeightFormat(enum.Enum):
    """How one tensor is held in memory."""

    FLOAT = "float"
    INT8 = "int8"
    INT4 = "int4"
    BF16 = "bf16"  # a bf16 table beside fp32 activations (AUTO's form of a GGUF's quantized embedding / head)
    Q8_0 = "q8_0"  # a GGUF Q8_0 table as stored (AUTO's form of a Q8_0 embedding / head; bf16 where no kernel)


def check_float_mode(mode: WeightMode, dtype: torch.dtype) -> None:
    """A float mode names the dtype of every weight, so it must agree with the activation dtype."""
    if mode.float_dtype is not None and mode.float_dtype != dtype:
        raise InvalidRequestError(
            f"weights={mode.value} holds every weight as {mode.float_dtype}, which needs dtype {mode.float_dtype} "
            f"(got {dtype}); use weights=auto to quantize, or pass the matching dtype", param="weights")


def is_linear_weight(name: str) -> bool:
    parts = name.split(".")
    return name == LM_HEAD or (len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _LINEAR_NAMES)


def is_quantized(source: WeightSource) -> bool:
    return isinstance(source, GGUFTensor) and source.qtype not in _FLOAT_TYPES


def weight_format(name: str, source: WeightSource, mode: WeightMode, tied: bool) -> WeightFormat:
    """The format `name` takes under `mode`. A tied LM head stays FLOAT here: it follows the embedding."""
    if mode.float_dtype is not None or (tied and name == LM_HEAD):
        return WeightFormat.FLOAT
    if name == EMBEDDING:
        if mode is WeightMode.AUTO:
            return _table_format(source) if is_quantized(source) else WeightFormat.FLOAT
        return WeightFormat.INT8
    if not is_linear_weight(name):
        return WeightFormat.FLOAT
    if mode is WeightMode.INT8:
        return WeightFormat.INT8
    int4 = WeightFormat.INT4 if can_int4(tuple(source.shape)) else WeightFormat.INT8
    if isinstance(source, GGUFTensor) and source.qtype in GGUF_INT4_TYPES:
        return int4  # the file's codes, in AUTO and INT4 alike
    if mode is WeightMode.INT4:
        return WeightFormat.INT8 if name == LM_HEAD else int4  # quantizing the logits' matrix to 4 bits: no
    if not is_quantized(source):
        return WeightFormat.FLOAT  # AUTO keeps float files float
    return _table_format(source) if name == LM_HEAD else WeightFormat.INT8  # AUTO: no re-rounding of logits


def _table_format(source: GGUFTensor) -> WeightFormat:
    """AUTO's form of a quantized embedding / LM head: Q8_0 as stored, any other type as a bf16 table."""
    return WeightFormat.Q8_0 if source.qtype is GGMLQuantizationType.Q8_0 else WeightFormat.BF16
