"""Read a Hugging Face model directory: config.json and *.safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from freehold.config import ModelConfig, RopeScaling
from freehold.errors import ModelLoadError, UnsupportedModelError

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
}


def read_hf_config(path: Path) -> ModelConfig:
    """config.json (a model dir or the file itself) -> ModelConfig."""
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    archs = raw.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"unsupported model architecture {archs} (supported: {', '.join(_ARCHITECTURES)})")
    heads = raw["num_attention_heads"]
    scaling = None
    rs = raw.get("rope_scaling") or raw.get("rope_parameters") or {}  # transformers 5 writes rope_parameters
    rope_theta = raw.get("rope_theta", rs.get("rope_theta", 10000.0))
    if rs.get("rope_type", rs.get("type")) == "llama3":
        scaling = RopeScaling(rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                              rs["original_max_position_embeddings"])
    elif rs and rs.get("rope_type", rs.get("type")) not in ("default", None):
        raise UnsupportedModelError(f"unsupported rope_scaling {rs}")
    return ModelConfig(
        architecture=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        rope_scaling=scaling, tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", arch == "qwen2"), qk_norm=arch == "qwen3",
        name=path.name if path.is_dir() else path.parent.name)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    return tensors
