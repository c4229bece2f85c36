"""What 8-bit activations would cost and buy for prompt rows (a development probe; CI does not run it, and Freehold
has no such mode). Prompt rows multiply bf16 activations by the int4 weight rebuilt as bf16 (`Int4Linear.
_dequantized_gemm`); an int8 x int8 GEMM (`torch._int_mm`, oneDNN's VNNI/AMX path) has twice the multiplies per
instruction. This probe swaps that one method for variants and prints the default model's perplexity on the pydoc
text (`freehold eval ppl`'s windows, every row a prompt row) and the GEMM rates on the model's shapes:

    .venv/bin/python scripts/int8_activation_probe.py [--tokens 16384] [--rows 2048]

Variants (scales are absmax / 127, rounding to nearest even):
- default: the engine's prompt path (bf16 activations, the int4 weight rebuilt as bf16);
- w8 per channel: the rebuilt weight re-quantized to int8 per output channel, activations bf16 (fake quantized);
- a8 per row: activations quantized to int8 per row (one scale per token), the weight as default (fake quantized);
- a8 per 32: activations quantized per block of 32 along K (llama.cpp's Q8 activation blocks; fake quantized);
- w8a8 per row/channel: both, multiplied by `torch._int_mm` and scaled back (what an int8 GEMM would compute).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from freehold.kernels import native  # noqa: E402,F401  (before torch, as the server imports them)

import torch  # noqa: E402

from freehold.engine.memory import create_kv_cache  # noqa: E402
from freehold.eval.ppl import default_text, perplexity  # noqa: E402
from freehold.llm import LLM  # noqa: E402
from freehold.quant.int4 import Int4Linear  # noqa: E402


def quantize(x: torch.Tensor, dim: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp32 scales of x (absmax / 127 along `dim`, or per `block` elements of the last dim)."""
    x = x.float()
    if block is not None:
        x = x.view(*x.shape[:-1], x.shape[-1] // block, block)
        dim = -1
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(x / scale).to(torch.int8), scale


def fake(x: torch.Tensor, dim: int, block: int | None = None) -> torch.Tensor:
    codes, scale = quantize(x, dim, block)
    return (codes.float() * scale).reshape(x.shape)


_W8: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def w8(layer: Int4Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The rebuilt W^T [K, N] as int8 codes per output channel (computed once per layer) and their scales."""
    if id(layer) not in _W8:
        _W8[id(layer)] = quantize(layer.dequantize_t(torch.float32), dim=0)
    return _W8[id(layer)]


def w8_only(self: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    codes, scale = w8(self)
    return x.to(torch.bfloat16) @ (codes.float() * scale).to(torch.bfloat16)


def a8_row(self: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return fake(x, dim=1).to(torch.bfloat16) @ self.dequantize_t(torch.bfloat16)


def a8_block(self: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return fake(x, dim=1, block=32).to(torch.bfloat16) @ self.dequantize_t(torch.bfloat16)


def w8a8(self: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    wc, ws = w8(self)
    xc, xs = quantize(x, dim=1)
    return (torch._int_mm(xc, wc).float() * xs * ws).to(torch.bfloat16)


def gemm_rates(model: torch.nn.Module, rows: int) -> tuple[float, float]:
    """GFLOP/s (GOP/s) of bf16 torch.mm and int8 torch._int_mm over the model's distinct int4 layer shapes."""
    shapes = sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, Int4Linear)})
    totals = {"bf16": [0.0, 0.0], "int8": [0.0, 0.0]}
    for k, n in shapes:
        pairs = {"bf16": (torch.randn(rows, k).to(torch.bfloat16), torch.randn(k, n).to(torch.bfloat16), torch.mm),
                 "int8": (torch.randint(-127, 128, (rows, k), dtype=torch.int8),
                          torch.randint(-127, 128, (k, n), dtype=torch.int8), torch._int_mm)}
        for name, (a, b, mm) in pairs.items():
            mm(a, b)
            times = []
            for _ in range(9):
                t0 = time.perf_counter()
                mm(a, b)
                times.append(time.perf_counter() - t0)
            totals[name][0] += 2 * rows * k * n
            totals[name][1] += statistics.median(times)
    return tuple(flops / seconds / 1e9 for flops, seconds in totals.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="pydoc tokens for perplexity (1,024-token windows)")
    p.add_argument("--rows", type=int, default=2048, help="rows per GEMM call for the rates (the step budget)")
    args = p.parse_args()
    llm = LLM(None, progress=False, kv_cache_memory=64 << 20)
    ids = llm.encode_prompt(default_text())
    model = llm.loaded.model
    cache = create_kv_cache(llm.loaded.config, llm.engine.config, num_blocks=-(-1024 // llm.engine.config.block_size))
    bf16, int8 = gemm_rates(model, args.rows)
    print(f"GEMM on the model's shapes, {args.rows} rows: bf16 torch.mm {bf16:.0f} GFLOP/s, int8 torch._int_mm "
          f"{int8:.0f} GOP/s ({int8 / bf16:.2f}x)")
    default = Int4Linear._dequantized_gemm
    variants = [("default", default), ("w8 per channel", w8_only), ("a8 per row", a8_row),
                ("a8 per 32", a8_block), ("w8a8 per row/channel (torch._int_mm)", w8a8)]
    reference = None
    print(f"| prompt-row matmul | perplexity ({args.tokens} pydoc tokens) | vs default |")
    print("|---|---|---|")
    calls = [0]

    def counted(method):
        def run(self: Int4Linear, x: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return method(self, x)
        return run
    try:
        for name, method in variants:
            Int4Linear._dequantized_gemm = counted(method)
            calls[0] = 0
            ppl = perplexity(model, ids, 1024, args.tokens, cache=cache).perplexity
            if calls[0] == 0:  # e.g. a CPU without native bf16 GEMMs, where prompt rows take the int kernels
                raise SystemExit("the prompt rows never reached Int4Linear._dequantized_gemm on this machine: "
                                 "nothing to compare")
            reference = reference or ppl
            print(f"| {name} | {ppl:.4f} | {100 * (ppl / reference - 1):+.2f}% |", flush=True)
    finally:
        Int4Linear._dequantized_gemm = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
