"""How packed layers multiply on CPU, chosen by the KIND of each row, never by the batch size: decode rows take
the row-wise int kernels, prompt rows a bf16 GEMM over the weight dequantized for that one call (nothing
dequantized stays resident). The engine's runner marks the kinds: a generated token's row, every logits row it
samples from, and every row of a short prompt (fewer than `GEMM_MIN_PROMPT_TOKENS` tokens to compute when the
sequence was first admitted) are decode rows; a long prompt's rows are prompt rows. Each is a property of the row
and its own sequence, so a row computes the same bits whatever shares its step. Outside a `row_kinds` block (a
direct model call, `freehold eval ppl`) every row is a prompt row.

Measured on the development machine (AMD Zen 5, AVX512-BF16, 2 threads, torch 2.13), ms per 576x1536 matmul:
    tokens                       1      64     128    512
    int4 kernel (bf16 in)      0.018  0.32   0.64   2.58
    int8 kernel (bf16 in)      0.015  0.32   0.61   2.56
    fp32 GEMM                  0.041  0.60   1.13   4.18
    bf16 GEMM                  0.067  0.22   0.32   1.04    + dequantizing W: int8 0.10, int4 0.31
The int kernels need bf16 activations (with fp32 ones they are 20-40x slower), so compute is bf16 either way
and outputs return in the caller's dtype. Decode reads each weight once per token and is bound by weight bytes:
the kernels win. Prefill is bound by arithmetic: the bf16 GEMM wins, on CPUs that multiply bf16 natively
(AVX512-BF16 or AMX); on others the kernels serve every row. fp32 never wins, so there is no fp32 path.
Where Freehold's own int4 kernel runs (kernels/quant_matmul.c: CPUs with AVX512-VNNI) it replaces PyTorch's int4
kernel for decode rows and takes fp32 activations (no bf16 rounding on that path).

Why a row's path is batch-invariant: the kernels compute each row on its own, and the bf16 GEMM's rows did not
depend on M in tests/unit/test_quant_rows.py (this host's oneDNN). Why short prompts take the kernels: the GEMM
first rebuilds every layer's W^T in bf16 (the default model's 120 int4 layers: ~19 ms with the native rebuild,
~80 ms with torch ops), which the kernels beat on short prompts. Prompt time alone, a 2-core AMD EPYC (Zen 4),
kernels vs GEMM, medians of 6 alternated runs (2026-12-02; docs/performance.md): 16 tokens 26 vs 54 ms, 64 tokens
84 vs 97 ms, 96 tokens 122 vs 118 ms, 128 tokens 155 vs 136 ms, 192 tokens 245 vs 182 ms: the GEMM wins from
~100 tokens. The threshold stays above that crossover on purpose: a prompt computed cold on the GEMM and repeated
with its blocks from the prefix cache computes its short tail on the kernels, so the repeat's output can differ from
the first run's; below the threshold both runs take the kernels and agree bit for bit when the cached blocks are the
prompt's own (a 150-token prompt in tests/integration/test_default_weights.py; shared blocks that a longer prompt
computed on the GEMM are not: docs/performance.md, issue 19). A threshold of 128 would trade that for 12-20% less
prompt time on prompts of 128-191 tokens.
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

COMPUTE_DTYPE = torch.bfloat16
GEMM_MIN_PROMPT_TOKENS = 192  # a prompt with this many tokens to compute takes the GEMM (see the timings above)


@functools.cache
def native_bf16_gemm() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class RowKind(enum.Enum):
    PROMPT = "prompt"  # a long prompt's row, any row of a direct model call: the bf16 GEMM where it is native
    DECODE = "decode"  # a generated token's, a short prompt's or a sampled logits row: the row-wise kernels


class _Split(NamedTuple):
    """A flat batch of both kinds, as runs of consecutive rows of one kind (a step's chunks are contiguous, so a step
    has few runs): slices instead of index tensors, so that rows are gathered and placed by copies, not scatters."""
    decode: tuple[slice, ...]
    prompt: tuple[slice, ...]
    num_rows: int


def _runs(mask: torch.Tensor) -> _Split:
    """mask [T] bool (True: DECODE) -> the runs of each kind, in order."""
    t = len(mask)
    if t == 0:
        return _Split((), (), 0)
    edges = [0] + ((mask[1:] != mask[:-1]).nonzero().squeeze(1) + 1).tolist() + [t]
    starts = mask[edges[:-1]].tolist()
    runs = [(d, slice(a, b)) for d, a, b in zip(starts, edges, edges[1:])]
    return _Split(tuple(r for d, r in runs if d), tuple(r for d, r in runs if not d), t)


def _gather(x: torch.Tensor, runs: tuple[slice, ...]) -> torch.Tensor:
    return x[runs[0]] if len(runs) == 1 else torch.cat([x[r] for r in runs])


def _place(y: torch.Tensor, rows: torch.Tensor, runs: tuple[slice, ...]) -> None:
    """y[run] = the next rows of `rows`, run by run (converted to y's dtype)."""
    start = 0
    for r in runs:
        n = r.stop - r.start
        y[r].copy_(rows[start:start + n])
        start += n


_ROW_KINDS: contextvars.ContextVar[RowKind | _Split | None] = contextvars.ContextVar("row_kinds", default=None)


@contextlib.contextmanager
def row_kinds(kinds: RowKind | torch.Tensor) -> Iterator[None]:
    """Scope one forward pass: which rows of the packed layers' inputs are decode rows. `kinds`: one kind for every
    row of every packed call in the block, or a bool mask [T] (True: DECODE) for a flat batch of T rows, which
    every packed call in the block must then see. Outside any block every row is a PROMPT row. Refuses nesting."""
    if _ROW_KINDS.get() is not None:
        raise RuntimeError("row_kinds blocks do not nest")
    if isinstance(kinds, torch.Tensor):
        split = _runs(kinds)
        kinds = RowKind.PROMPT if not split.decode else RowKind.DECODE if not split.prompt else split
    token = _ROW_KINDS.set(kinds)
    try:
        yield
    finally:
        _ROW_KINDS.reset(token)


def all_decode_rows() -> bool:
    """Whether every row of the current forward pass is a decode row (a `row_kinds(RowKind.DECODE)` block, or a
    mask that is all True)."""
    return _ROW_KINDS.get() is RowKind.DECODE


def gemm_is_native(x: torch.Tensor) -> bool:
    """Whether prompt rows of x dequantize W for one bf16 GEMM (CPU with native bf16) instead of the int kernel."""
    return x.device.type == "cpu" and native_bf16_gemm()


def by_row_kind(x: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor],
                gemm: Callable[[torch.Tensor], torch.Tensor], scoped: bool = False) -> torch.Tensor:
    """x: [T, K] -> [T, N]: kernel(decode rows), gemm(prompt rows), in the kernel's output dtype. `scoped`: the two
    functions are blocks of several packed calls (an MLP), each run in a scope where all its rows are of its kind,
    so that the calls inside see only those rows."""
    kinds = _ROW_KINDS.get() or RowKind.PROMPT
    if isinstance(kinds, RowKind):
        return kernel(x) if kinds is RowKind.DECODE else gemm(x)
    assert kinds.num_rows == x.shape[0], "a packed call inside row_kinds(mask) must see the flat batch"
    y_decode = _in_scope(scoped, RowKind.DECODE, kernel, _gather(x, kinds.decode))
    y = y_decode.new_empty(x.shape[0], y_decode.shape[1])
    _place(y, y_decode, kinds.decode)
    _place(y, _in_scope(scoped, RowKind.PROMPT, gemm, _gather(x, kinds.prompt)), kinds.prompt)
    return y


def _in_scope(scoped: bool, kind: RowKind, fn: Callable[[torch.Tensor], torch.Tensor],
              rows: torch.Tensor) -> torch.Tensor:
    """fn(rows), inside a scope where every row is of `kind` when `scoped` (the caller's scope restored after)."""
    token = _ROW_KINDS.set(kind) if scoped else None
    try:
        return fn(rows)
    finally:
        if token is not None:
            _ROW_KINDS.reset(token)
