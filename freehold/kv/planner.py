"""`freehold kv-plan`: what fits in a given memory, before you buy it.

KV bytes per token = layers x 2 (K and V) x kv_heads x head_dim x bytes per element
(int8 adds one fp16 scale per token per head for K and for V: layers x 2 x kv_heads x 2 bytes).
Tokens that fit = (memory - weight bytes) / KV bytes per token, rounded down to whole blocks;
concurrent requests at context C = blocks that fit // ceil(C / block_size).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from freehold.config import ModelConfig
from freehold.errors import InvalidRequestError
from freehold.models.gguf_loader import load_gguf
from freehold.models.hf_loader import read_hf_config

KV_DTYPES = {"fp32": torch.float32, "fp16/bf16": torch.bfloat16, "int8": torch.int8}  # --kv-dtype choices


@dataclass(frozen=True)
class PlanRow:
    kv_dtype: str
    bytes_per_token: int
    tokens: int
    requests_at: dict[int, int]  # context length -> concurrent requests


@dataclass(frozen=True)
class KVPlan:
    model: ModelConfig
    weight_bytes: int
    memory_bytes: int
    block_size: int
    rows: tuple[PlanRow, ...]


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str) -> int:
    return cfg.kv_bytes_per_token(KV_DTYPES[kv_dtype])


def read_model_for_plan(path: Path) -> tuple[ModelConfig, int]:
    """(config, weight bytes): a GGUF counts its stored tensor bytes; an HF dir its safetensors files;
    a bare config.json assumes 16-bit weights."""
    if path.is_file() and path.suffix == ".gguf":
        model = load_gguf(path)
        return model.config, sum(t.data.nbytes for t in model.tensors.values())
    cfg = read_hf_config(path)
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    weights = sum(f.stat().st_size for f in files) if files else cfg.num_parameters() * 2
    return cfg, weights


def plan(cfg: ModelConfig, weight_bytes: int, memory_bytes: int, block_size: int = 16,
         contexts: tuple[int, ...] = (2048, 4096, 8192, 32768, 131072)) -> KVPlan:
    free = max(0, memory_bytes - weight_bytes)
    contexts = tuple(c for c in contexts if c <= cfg.max_position_embeddings) or (cfg.max_position_embeddings,)
    rows = []
    for name in KV_DTYPES:
        per_token = kv_bytes_per_token(cfg, name)
        blocks = free // (per_token * block_size)
        rows.append(PlanRow(name, per_token, blocks * block_size,
                            {c: blocks // -(-c // block_size) for c in contexts}))
    return KVPlan(cfg, weight_bytes, memory_bytes, block_size, tuple(rows))


def format_plan(p: KVPlan) -> str:
    cfg = p.model
    gib = 2 ** 30
    lines = [f"model {cfg.name}: {cfg.num_layers} layers, {cfg.num_kv_heads} KV heads x {cfg.head_dim} head dim, "
             f"context {cfg.max_position_embeddings}",
             f"memory {p.memory_bytes / gib:.2f} GiB - weights {p.weight_bytes / gib:.2f} GiB = "
             f"{max(0, p.memory_bytes - p.weight_bytes) / gib:.2f} GiB for KV (block size {p.block_size})", ""]
    contexts = list(p.rows[0].requests_at)
    header = f"{'kv dtype':<10} {'KiB/token':>10} {'tokens':>12} " + " ".join(f"{'@' + str(c):>9}" for c in contexts)
    lines += [header, "-" * len(header)]
    for r in p.rows:
        lines.append(f"{r.kv_dtype:<10} {r.bytes_per_token / 1024:>10.2f} {r.tokens:>12,} "
                     + " ".join(f"{r.requests_at[c]:>9,}" for c in contexts))
    lines += ["", "@N: concurrent requests that each hold N tokens of context. Shared prompt prefixes are stored "
              "once (prefix cache), so requests sharing a system prompt fit more."]
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '1073741824' -> bytes (binary units)."""
    units = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = s[-1] if s and s[-1] in units else ""
    try:
        value = float(s[:-1] if suffix else s)
    except ValueError:
        raise InvalidRequestError(f"cannot read memory size {text!r} (examples: 8G, 512M, 1073741824)") from None
    return int(value * units[suffix])
