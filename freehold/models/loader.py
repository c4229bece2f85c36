"""Load a model (GGUF file or Hugging Face directory) into Freehold's Llama-family module."""
from __future__ import annotations

import ctypes
import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from freehold.config import ModelConfig
from freehold.errors import ModelLoadError
from freehold.models.fuse import fuse_projections
from freehold.models.gguf_loader import load_gguf
from freehold.models.hf_loader import read_hf_config, read_safetensors
from freehold.models.llama import LlamaForCausalLM
from freehold.models.locate import resolve_model_path
from freehold.quant.convert import PackedWeight, as_float, pack_weight, swap_modules
from freehold.quant.modes import WeightFormat, WeightMode, check_float_mode, weight_format


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    path: Path
    weights: str = ""  # how the linear layers are held: "int4", "int8", "float32", "bfloat16" (or several, "+")

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() not in seen and t.device.type != "meta":
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], packed: dict[str, PackedWeight],
           device: torch.device, freq_factors: torch.Tensor | None) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    swap_modules(model, packed)  # packed layers hold their data already; everything else waits on meta for `state`
    missing = [k for k, v in model.state_dict().items()
               if v.is_meta and k not in state and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise ModelLoadError(f"model file lacks tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):  # a packed head is tied already
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        from freehold.layers.rotary import RotaryEmbedding
        model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                     cfg.rope_scaling, freq_factors)
    return fuse_projections(model.to(device).eval())


def load_model(model: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               progress: bool = True, weights: WeightMode = WeightMode.AUTO) -> LoadedModel:
    """Load onto `device`; activations and float weights use `dtype`. `weights` picks which matrices stay packed
    (freehold.quant): AUTO keeps a GGUF's own quantization (Q4_0/Q4_1 -> int4, Q8_0 -> int8) and leaves float
    files float; INT8 / INT4 quantize on load; FP32 / BF16 dequantize every weight (and must match `dtype`)."""
    check_float_mode(weights, dtype)
    path = resolve_model_path(model)
    loaded = _load(path, dtype, torch.device(device), progress, weights)
    _return_freed_memory()  # after `_load` returns, the file's mapped pages and the temporaries are garbage
    return loaded


def _load(path: Path, dtype: torch.dtype, device: torch.device, progress: bool, weights: WeightMode) -> LoadedModel:
    cfg, freq_factors, sources = _read(path)
    state, packed, linear = {}, {}, set()
    for name, t in tqdm(sources.items(), desc=f"loading {path.name}", unit="tensor", disable=not progress,
                        file=sys.stderr):
        fmt = weight_format(name, t, weights, cfg.tie_word_embeddings)
        if name.endswith("_proj.weight"):
            linear.add(str(dtype).removeprefix("torch.") if fmt is WeightFormat.FLOAT else fmt.value)
        if fmt is WeightFormat.FLOAT:
            state[name] = as_float(t, dtype)
        else:
            packed[name] = pack_weight(t, fmt, device)
    return LoadedModel(_build(cfg, state, packed, device, freq_factors), cfg, path, "+".join(sorted(linear)))


def _read(path: Path) -> tuple[ModelConfig, torch.Tensor | None, dict]:
    """(config, rope frequency factors, tensors by Hugging Face name) from a GGUF file or an HF directory."""
    if path.is_file():
        gguf = load_gguf(path)
        return gguf.config, gguf.rope_freq_factors, gguf.tensors
    return read_hf_config(path), None, read_safetensors(path)


def _return_freed_memory() -> None:
    """Hand the heap pages the conversion freed back to the OS (glibc keeps them otherwise: a GGUF's many
    mid-sized temporaries would stay resident, about 240 MB for the default model)."""
    gc.collect()  # the GGUF reader's field objects hold reference cycles
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
