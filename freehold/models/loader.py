"""Load a model (GGUF file or Hugging Face directory) into Freehold's Llama-family module."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from freehold.config import ModelConfig
from freehold.errors import ModelLoadError
from freehold.models.gguf_loader import GGUFModel, load_gguf
from freehold.models.hf_loader import read_hf_config, read_safetensors
from freehold.models.llama import LlamaForCausalLM
from freehold.models.locate import resolve_model_path


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    path: Path
    gguf: GGUFModel | None  # kept for the quantization layer, which packs the raw blocks

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() not in seen and t.device.type != "meta":
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device,
           freq_factors: torch.Tensor | None) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    missing = [k for k in model.state_dict() if k not in state and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise ModelLoadError(f"model file lacks tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        from freehold.layers.rotary import RotaryEmbedding
        model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                     cfg.rope_scaling, freq_factors)
    return model.to(device).eval()


def load_model(model: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               progress: bool = True) -> LoadedModel:
    """Dequantize every weight into `dtype` on `device` (native quantized weights: freehold.quant)."""
    path = resolve_model_path(model)
    gguf = None
    if path.is_file():
        gguf = load_gguf(path)
        cfg, freq_factors = gguf.config, gguf.rope_freq_factors
        items = tqdm(gguf.tensors.items(), desc=f"loading {path.name}", unit="tensor",
                     disable=not progress, file=sys.stderr)
        state = {name: t.dequantize(dtype) for name, t in items}
    else:
        cfg, freq_factors = read_hf_config(path), None
        state = {k: v.to(dtype) for k, v in read_safetensors(path).items()}
    return LoadedModel(_build(cfg, state, torch.device(device), freq_factors), cfg, path, gguf)
