"""Read a GGUF file: model config from its metadata, tensors renamed to Hugging Face names, and llama.cpp's
Q/K row permutation undone. Tensors stay raw (possibly quantized) until a caller dequantizes or packs them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from freehold.config import ModelConfig, RopeScaling
from freehold.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Tensor types the loader can turn into floats (keeping them packed is the quantization layer's job).
SUPPORTED_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                   GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                   GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q6_K,
                   GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: `data` is the file's rows (uint8 blocks for quantized types), shape is (rows, cols)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = dequantize(self.data, self.qtype).reshape(self.shape)
        return torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).to(dtype)


@dataclass(frozen=True)
class GGUFModel:
    config: ModelConfig
    tensors: dict[str, GGUFTensor]  # Hugging Face names
    rope_freq_factors: torch.Tensor | None
    path: Path


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, EOFError, OverflowError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc} (truncated or corrupt file?)") from exc


def field_value(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader: GGUFReader, name: str) -> ModelConfig:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported model architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def need(key: str):
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(f"GGUF metadata is missing {arch}.{key}")
        return value

    num_heads, hidden = int(need("attention.head_count")), int(need("embedding_length"))
    head_dim = field_value(reader, f"{arch}.attention.key_length") or hidden // num_heads
    vocab = field_value(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling = None
    if field_value(reader, f"{arch}.rope.scaling.type") == "llama3":  # rare: most llama3 GGUFs ship rope_freqs
        scaling = RopeScaling(float(need("rope.scaling.factor")), 1.0, 4.0,
                              int(need("rope.scaling.original_context_length")))
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=arch, vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
        num_heads=num_heads, num_kv_heads=int(field_value(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(head_dim), max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names, name=name)


def hf_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None for tensors the model does not use."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rows(data: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation of Q/K rows: per head, rows were reordered from
    [pair, half] to [half, pair]; we restore Hugging Face's rotate-half row order.
    Rows hold whole quantized blocks, so this works on packed data too."""
    rows = data.shape[0]
    return data.reshape(num_heads, rows // num_heads // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def read_tensors(reader: GGUFReader, cfg: ModelConfig) -> tuple[dict[str, GGUFTensor], torch.Tensor | None]:
    tensors, freq_factors = {}, None
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(f"tensor {t.name} has unsupported GGUF type {t.tensor_type.name}")
        if t.name == "rope_freqs.weight":
            freq_factors = torch.from_numpy(np.array(t.data, dtype=np.float32))
            continue
        name = hf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (columns) first
        data = t.data
        if cfg.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            data = unpermute_rows(data, heads)
        tensors[name] = GGUFTensor(name, t.tensor_type, shape, data)
    return tensors, freq_factors


def load_gguf(path: Path, name: str | None = None) -> GGUFModel:
    reader = open_gguf(path)
    cfg = read_config(reader, name or str(field_value(reader, "general.name", path.stem)))
    tensors, freq_factors = read_tensors(reader, cfg)
    return GGUFModel(cfg, tensors, freq_factors, path)
