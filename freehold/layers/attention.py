"""Attention over a paged KV cache.

The flat batch holds T tokens: first the decode rows, then the prefill chunks. Each layer writes its new K/V into
cache slots (slot = block_id * block_size + offset) and then attends:
  decode:  on CPU, the native kernel (kernels/paged_attention.c) reads each sequence's blocks in place, each row up
           to its own position (the runner sends prompt chunks this way too on CPU: every row computed on its own,
           whatever the chunking); elsewhere one batched SDPA over each row's gathered blocks, masked past its length;
  prefill: (on CPU with fp32 activations, only long prompts: runner.SDPA_MIN_ROWS_X_CONTEXT) one SDPA per chunk; a
           chunk that starts at position 0 attends to its own K/V (as the cache stores them: rounded to bf16 or int8
           when the cache is) with a causal mask, a chunk that continues a cached prefix gathers the prefix from the
           cache and uses an offset causal mask.
softmax(q k^T / sqrt(D)) v with GQA: query head h reads KV head h // (H / KVH).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from freehold.kernels import checks, native


@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first row of this chunk in the flat batch
    end: int  # one past the last row
    context_len: int  # tokens in the cache for this sequence after this chunk is written
    block_table: torch.Tensor  # [num_blocks] int64, the sequence's blocks covering context_len

    @property
    def num_new(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class AttentionMetadata:
    """Where a flat batch's tokens live in the KV cache; built once per step by the runner."""

    slot_mapping: torch.Tensor  # [T] int64 cache slot of each token
    num_decode: int  # rows [0, num_decode) are decode tokens
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64 (padded with block 0)
    decode_context_lens: torch.Tensor | None  # [B] int64
    prefills: tuple[PrefillChunk, ...]
    # [R + 1] int64 row offsets: run r is decode rows [runs[r], runs[r + 1]), one sequence's consecutive positions
    # (the same block table); the native kernel reads such a run's context once for all its rows. None: one row each
    decode_runs: torch.Tensor | None = None


@dataclass(frozen=True)
class NativeKV:
    """One layer's storage as the native decode kernel reads it."""

    k: torch.Tensor  # [num_blocks, block_size, KVH, D], contiguous
    v: torch.Tensor
    k_scales: torch.Tensor | None  # int8 only: fp16 [num_blocks, block_size, KVH]
    v_scales: torch.Tensor | None
    code: int  # element type: 0 fp32, 1 bf16, 2 int8


class KVCache:
    """K and V storage for all layers: [layers, num_blocks, block_size, kv_heads, head_dim] each."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self._workspace: dict[str, torch.Tensor] = {}  # gather outputs, reused across layers and steps
        self._views: dict[int, NativeKV | None] = {}  # per layer, for the native decode kernel
        self._checked: AttentionMetadata | None = None  # the step whose decode arguments were last checked

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, KVH, D] stored at flat slots [T]."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(self.v.dtype))

    def round_trip(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v as a later `gather` would return them: what attention over this cache sees."""
        if self.k.dtype == k.dtype:
            return k, v
        return k.to(self.k.dtype).to(k.dtype), v.to(self.v.dtype).to(v.dtype)

    def transform_keys(self, blocks: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        """Transform the keys of `blocks` [n] int64, every layer: one layer at a time, fn gets an fp32 copy
        [n, block_size, KVH, D] and changes it in place; it is stored back in the cache's element type
        (freehold.kv.sink re-rotates a sliding window with it). Per layer with index_select / index_copy_: about
        10x faster than advanced indexing over all layers at once (docs/architecture.md), and the same bits."""
        for layer in range(self.k.shape[0]):
            k = self.k[layer].index_select(0, blocks).float()  # a copy even for fp32 (index_select)
            fn(k)
            self.k[layer].index_copy_(0, blocks, k.to(self.k.dtype))

    def gather(self, layer: int, block_tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """block_tables: [..., nb] -> K, V: [..., length, KVH, D] (the first `length` tokens of those blocks).
        index_select over whole blocks (rows of a [num_blocks, block_size*KVH*D] view) copies contiguous runs,
        about twice as fast as advanced indexing on the 5-D tensor. The results live in a reused workspace
        (no fresh pages to fault in every layer): valid until the next `gather`."""
        return (self._gather(self.k[layer], block_tables, length, "k"),
                self._gather(self.v[layer], block_tables, length, "v"))

    def native_view(self, layer: int) -> NativeKV | None:
        """This layer's K/V for the native kernel, or None where it cannot read them (device, dtype); built once
        per layer (the storage never moves)."""
        if layer not in self._views:
            self._views[layer] = self._native_view(layer)
        return self._views[layer]

    def _native_view(self, layer: int) -> NativeKV | None:
        code = {torch.float32: 0, torch.bfloat16: 1}.get(self.k.dtype)
        if code is None or self.k.device.type != "cpu":
            return None
        return NativeKV(self.k[layer], self.v[layer], None, None, code)

    def workspace(self, name: str, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A [rows, *row_shape] buffer that grows to the largest request and is then reused."""
        buf = self._workspace.get(name)
        numel = rows * math.prod(row_shape)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=self.k.device)
            self._workspace[name] = buf
        return buf[:numel].view(rows, *row_shape)

    def _gather(self, store: torch.Tensor, block_tables: torch.Tensor, length: int, name: str) -> torch.Tensor:
        num_blocks, block_size, kv_heads, head_dim = store.shape
        flat = block_tables.reshape(-1)
        rows = torch.index_select(store.view(num_blocks, -1), 0, flat,
                                  out=self.workspace(name, flat.numel(), (block_size * kv_heads * head_dim,),
                                                     store.dtype))
        out = rows.view(*block_tables.shape[:-1], block_tables.shape[-1] * block_size, kv_heads, head_dim)
        return out[..., :length, :, :]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q: [B, L, H, D], k/v: [B, S, KVH, D] -> [B, L, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


def _decode_attention(layer: int, q: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                      new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q: [B, H, D], one token per decoding sequence -> [B, H, D]. `new_kv`: this step's K/V rows [B, KVH, D],
    not yet stored (a decode-only step hands them to the kernel, which stores them first)."""
    kernel = native.paged_attention() if q.device.type == "cpu" and q.dtype == torch.float32 else None
    view = cache.native_view(layer) if kernel is not None else None
    if view is not None:
        if new_kv is not None and not all(_rows_ok(t) for t in new_kv):
            cache.write(layer, meta.slot_mapping, *new_kv)
            new_kv = None
        if cache._checked is not meta:  # every layer of a step has the same shapes and indices: checked once
            checks.paged_decode_step(view, q.contiguous(), new_kv, meta.decode_block_tables, meta.decode_context_lens,
                                     meta.slot_mapping, meta.decode_runs)
            cache._checked = meta
        return _native_decode(kernel, view, q.contiguous(), meta, new_kv)
    if new_kv is not None:
        cache.write(layer, meta.slot_mapping, *new_kv)
    max_len = int(meta.decode_context_lens.max())
    kd, vd = cache.gather(layer, meta.decode_block_tables, max_len)  # [B, S, KVH, D]
    pos = torch.arange(max_len, device=q.device)
    mask = (pos[None, :] < meta.decode_context_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
    return _sdpa(q[:, None], kd, vd, mask, causal=False)[:, 0]


def _native_decode(kernel, kv: NativeKV, q: torch.Tensor, meta: AttentionMetadata,
                   new_kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The kernel stores `new_kv` (fp32 rows, in the cache's element type) before attending, when given."""
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = kv.k.shape
    tables, lens = meta.decode_block_tables.contiguous(), meta.decode_context_lens.contiguous()
    out = torch.empty_like(q)
    scales = (kv.k_scales.data_ptr(), kv.v_scales.data_ptr()) if kv.k_scales is not None else (None, None)
    store = (None, None, 0, 0, None)
    if new_kv is not None:
        (k, v), slots = new_kv, meta.slot_mapping.contiguous()  # held: the kernel reads these pointers
        store = (k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), slots.data_ptr())
    runs = meta.decode_runs.contiguous() if meta.decode_runs is not None else None
    status = kernel(q.data_ptr(), out.data_ptr(), kv.k.data_ptr(), kv.v.data_ptr(), *scales, kv.code,
                    tables.data_ptr(), lens.data_ptr(), batch, tables.shape[1], heads, kv_heads, head_dim,
                    block_size, head_dim ** -0.5, *store, runs.data_ptr() if runs is not None else None,
                    runs.shape[0] - 1 if runs is not None else 0)
    if status:
        raise RuntimeError(f"native paged attention failed (status {status}: shape or memory)")
    return out


def _rows_ok(t: torch.Tensor) -> bool:
    """[B, KVH, D] fp32 whose rows (one per sequence) are each contiguous."""
    return t.dtype == torch.float32 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cache: KVCache | None, meta: AttentionMetadata | None) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D] for the new tokens -> [T, H, D].

    With no cache (perplexity, parity checks) the whole batch is one causal sequence.
    """
    if cache is None or meta is None:
        return _sdpa(q[None], k[None], v[None], None, causal=True)[0]
    if meta.num_decode == q.shape[0]:  # a decode-only step: no chunk beside it; the kernel stores the new K/V
        return _decode_attention(layer, q, cache, meta, (k, v))
    cache.write(layer, meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    if meta.num_decode:
        out[:meta.num_decode] = _decode_attention(layer, q[:meta.num_decode], cache, meta)
    for chunk in meta.prefills:
        qs = q[chunk.start:chunk.end]
        if chunk.context_len == chunk.num_new:  # fresh sequence: attend to its own new K/V
            kc, vc = cache.round_trip(k[chunk.start:chunk.end], v[chunk.start:chunk.end])
            out[chunk.start:chunk.end] = _sdpa(qs[None], kc[None], vc[None], None, causal=True)[0]
            continue
        kc, vc = cache.gather(layer, chunk.block_table, chunk.context_len)  # [S, KVH, D]
        # query i sits at position (S - L + i) and sees keys 0..S-L+i
        offset = chunk.context_len - chunk.num_new
        rows = torch.arange(chunk.num_new, device=q.device)[:, None] + offset
        mask = torch.arange(chunk.context_len, device=q.device)[None, :] <= rows  # [L, S]
        out[chunk.start:chunk.end] = _sdpa(qs[None], kc[None], vc[None], mask[None, None], causal=False)[0]
    return out
