"""Checks at the Python boundary of the native kernels. The C code trusts the pointers and sizes it is given, so
arguments that would make it read or write outside a tensor are refused here, with an error naming the problem,
instead of reaching the kernel.

Kept cheap: a decode step of the default model makes ~240 kernel calls. The ~210 calls of the int4, RMSNorm and
RoPE kernels compare one size each, the one that varies with the call (the activations' width, or their rows,
against weights or tables that were made together with consistent shapes). Paged attention's indices (block
tables, context lengths, slots), which the scheduler rewrites every step, are checked by value with one min/max
reduction each, together with the query and cache layout, once per step (every layer of a step shares them); the
LM head's table kernels run once per step and are checked in full.
"""
from __future__ import annotations

import torch

Q8_GROUP = 32  # k per fp16 scale of a GGUF Q8_0 table (quant_matmul.c's GROUP)


class KernelArgumentError(ValueError):
    """Arguments a native kernel would use to read or write outside its tensors."""


def _fail(kernel: str, problem: str):
    raise KernelArgumentError(f"native {kernel} kernel: {problem}")


def _dense(kernel: str, name: str, t: torch.Tensor, dtype: torch.dtype, dim: int) -> None:
    if t.dtype != dtype or t.dim() != dim or not t.is_contiguous():
        _fail(kernel, f"{name} must be a contiguous {dim}-D {dtype} tensor, got {t.dtype} "
                      f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")


def _index(kernel: str, name: str, t: torch.Tensor, dim: int) -> None:
    if t.dtype != torch.int64 or t.dim() != dim:
        _fail(kernel, f"{name} must be a {dim}-D int64 tensor, got {t.dtype} {tuple(t.shape)}")


def _within(kernel: str, name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every element of `t` in [low, high)."""
    if t.numel():
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < low or hi >= high:
            _fail(kernel, f"{name} holds {lo if lo < low else hi}, outside [{low}, {high})")


# -- paged decode attention (paged_attention.c) ------------------------------------------------------------------
def paged_decode_step(view, q: torch.Tensor, new_kv: tuple[torch.Tensor, torch.Tensor] | None,
                      tables: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor,
                      runs: torch.Tensor | None = None) -> None:
    """A decode step's arguments against one layer's cache, once per step (every layer of a step has the same
    shapes and indices): block tables [B, max_blocks] within the pool, context lengths [B] within a table row's width
    (max_blocks * block_size; padding entries are block 0, inside the pool), the step's slots [T] within the cache; the query [B, H, D] contiguous fp32; new K/V rows
    [B, KVH, D] (or None) fp32 with each row contiguous, and at least B slots for them.
    view: the layer's `layers.attention.NativeKV`: K and V [num_blocks, block_size, KVH, D] of the element type
    `code` names, and for int8 the fp16 scales [num_blocks, block_size, KVH]."""
    kernel = "paged attention"
    k_cache, v_cache = view.k, view.v
    scales = (view.k_scales, view.v_scales) if view.k_scales is not None else ()
    dtype = (torch.float32, torch.bfloat16, torch.int8)[view.code]
    _dense(kernel, "K cache", k_cache, dtype, 4)
    _dense(kernel, "V cache", v_cache, dtype, 4)
    if v_cache.shape != k_cache.shape:
        _fail(kernel, f"V cache {tuple(v_cache.shape)} differs from K cache {tuple(k_cache.shape)}")
    for name, s in zip(("K scales", "V scales"), scales):
        _dense(kernel, name, s, torch.float16, 3)
        if s.shape != k_cache.shape[:3]:
            _fail(kernel, f"{name} {tuple(s.shape)} do not match the cache's {tuple(k_cache.shape[:3])}")
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    _index(kernel, "block tables", tables, 2)
    batch = tables.shape[0]
    _index(kernel, "context lengths", lens, 1)
    _index(kernel, "slots", slots, 1)
    if lens.shape[0] != batch:
        _fail(kernel, f"{lens.shape[0]} context lengths for {batch} block table rows")
    _dense(kernel, "q", q, torch.float32, 3)
    if q.shape[0] != batch or q.shape[2] != head_dim:
        _fail(kernel, f"q {tuple(q.shape)} for {batch} sequences and head_dim {head_dim}")
    for name, t in zip("kv", new_kv or ()):
        if t.dtype != torch.float32 or t.shape != (batch, kv_heads, head_dim) or t.stride(2) != 1 \
                or t.stride(1) != head_dim:
            _fail(kernel, f"new {name} rows must be fp32 [{batch}, {kv_heads}, {head_dim}] with each row "
                          f"contiguous, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if new_kv is not None and slots.shape[0] < batch:
        _fail(kernel, f"{slots.shape[0]} slots for {batch} new rows")
    _within(kernel, "a block table", tables, 0, num_blocks)
    _within(kernel, "a context length", lens, 0, tables.shape[1] * block_size + 1)
    _within(kernel, "a slot", slots, 0, num_blocks * block_size)
    if runs is not None:
        _runs(kernel, runs, tables, lens)


def _runs(kernel: str, runs: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> None:
    """Row offsets [R + 1] from 0 to B, increasing; within a run one block table and non-decreasing lengths (the
    kernel reads a run's context through its last row's table, each row up to its own length)."""
    _index(kernel, "runs", runs, 1)
    batch = tables.shape[0]
    if runs.shape[0] < 1 or int(runs[0]) != 0 or int(runs[-1]) != batch or bool((runs[1:] <= runs[:-1]).any()):
        _fail(kernel, f"runs must be increasing row offsets from 0 to {batch}, got {runs.tolist()[:8]}")
    first = torch.repeat_interleave(runs[:-1], runs[1:] - runs[:-1])  # each row's run's first row
    same_run = first[1:] == first[:-1]
    if bool((same_run & (lens[1:] < lens[:-1])).any()) or not torch.equal(tables[first], tables):
        _fail(kernel, "the rows of a run must share one block table with non-decreasing context lengths")


# -- products with packed weights (quant_matmul.c) ---------------------------------------------------------------
def _activations(kernel: str, x: torch.Tensor, dtype: torch.dtype, k: int) -> None:
    """x: contiguous [M, K] of `dtype` with K the weights' K (the kernel reads M * K elements)."""
    if x.dtype != dtype or x.dim() != 2 or x.shape[1] != k or not x.is_contiguous():
        _fail(kernel, f"x must be a contiguous {dtype} [M, {k}], got {x.dtype} {tuple(x.shape)}"
                      f"{'' if x.is_contiguous() else ' (not contiguous)'}")


def int4_operands(x: torch.Tensor, packed: torch.Tensor) -> None:
    """x fp32 [M, K] (made contiguous by the caller) against packed uint8 [N, K / 2], PyTorch's CPU int4pack. N and
    the (s, z) [K / 32, N, 2] are the same layer's, made with `packed` (quant/int4.py): only x's width varies."""
    if x.shape[1] != 2 * packed.shape[1]:
        _fail("int4 matmul", f"x {tuple(x.shape)} against weights of K = {2 * packed.shape[1]}")


def q8_operands(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """x fp32 [M, K]; codes int8 [N, K]; scales fp16 [N, K / 32]."""
    n, k = codes.shape
    _activations("Q8_0 matmul", x, torch.float32, k)
    _dense("Q8_0 matmul", "codes", codes, torch.int8, 2)
    _dense("Q8_0 matmul", "scales", scales, torch.float16, 2)
    if scales.shape != (n, k // Q8_GROUP):
        _fail("Q8_0 matmul", f"scales {tuple(scales.shape)} for codes {tuple(codes.shape)}")


def bf16_operands(x: torch.Tensor, table: torch.Tensor) -> None:
    """x bf16 [M, K]; table bf16 [N, K]."""
    _dense("bf16 matmul", "table", table, torch.bfloat16, 2)
    _activations("bf16 matmul", x, torch.bfloat16, table.shape[1])


# -- the small ops of a decode step (rms_norm.c, rope.c) ---------------------------------------------------------
def rms_norm_operands(x: torch.Tensor, weight: torch.Tensor) -> None:
    """x [..., dim] (the caller makes it contiguous and checks the residual's shape) against the weight [dim]."""
    if weight.shape[0] != x.shape[-1]:
        _fail("RMSNorm", f"weight {tuple(weight.shape)} for rows of {x.shape[-1]}")


def rope_operands(x: torch.Tensor, cos: torch.Tensor) -> None:
    """x [T, heads, D] against the tables cos and sin [T, 1, D] (contiguous fp32, built together for one forward
    pass and the model's head_dim: layers/rotary.py): only the rows vary."""
    if cos.shape[0] != x.shape[0]:
        _fail("RoPE", f"tables {tuple(cos.shape)} for x {tuple(x.shape)}")
