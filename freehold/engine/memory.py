"""KV budget: how many blocks the cache gets, from an explicit byte size or a fraction of free memory, and the
cache that holds them in the configured KV dtype."""
from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from freehold.config import EngineConfig, ModelConfig
from freehold.errors import InvalidRequestError
from freehold.layers.attention import KVCache
from freehold.quant.kv_int8 import Int8KVCache


@dataclass(frozen=True)
class KVBudget:
    bytes_per_token: int
    block_size: int
    num_blocks: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    def sequences_at(self, context_len: int) -> int:
        """Concurrent sequences that fit when each uses `context_len` tokens (rounded up to whole blocks)."""
        blocks_per_seq = -(-context_len // self.block_size)
        return self.num_blocks // blocks_per_seq


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def plan_kv(model: ModelConfig, cfg: EngineConfig, bytes_per_token: int | None = None) -> KVBudget:
    per_token = bytes_per_token or model.kv_bytes_per_token(cfg.cache_dtype)
    budget = cfg.kv_cache_memory
    if budget is None:
        budget = int(free_memory_bytes(torch.device(cfg.device)) * cfg.kv_cache_fraction)
    num_blocks = budget // (per_token * cfg.block_size)
    if num_blocks < 1:
        raise InvalidRequestError(
            f"KV cache memory {budget} bytes holds no block of {cfg.block_size} tokens "
            f"({per_token * cfg.block_size} bytes needed)", param="kv_cache_memory")
    return KVBudget(per_token, cfg.block_size, int(num_blocks))


def create_kv_cache(model: ModelConfig, cfg: EngineConfig, num_blocks: int) -> KVCache:
    """A float cache in `cfg.cache_dtype`, or an int8 one whose `gather` returns the activation dtype."""
    shape = (model.num_layers, num_blocks, cfg.block_size, model.num_kv_heads, model.head_dim)
    if cfg.cache_dtype == torch.int8:
        return Int8KVCache(*shape, cfg.dtype, torch.device(cfg.device))
    return KVCache(*shape, cfg.cache_dtype, torch.device(cfg.device))
