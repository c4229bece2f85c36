"""A burst of prompts arriving together, prefilled on the default engine, against this machine's ceiling for it.

The last first token of a burst waits for every prompt of the burst: its TTFT is at least (burst tokens) / (prefill
tokens/s). Most of a prompt token's work is the linear layers' matmuls, 2 N K FLOPs per token for each [N, K]
weight; a prompt's rows run them as bf16 GEMMs (freehold.quant.compute; a prompt with fewer than 192 tokens to
compute takes the int4 kernels instead, slower per token at that length). The ceiling is what those GEMMs alone would
take at the rate this machine's bf16 GEMM reaches on the model's own shapes (`--gemm-rows` rows per call, default
the engine's step budget), with nothing else: no attention, norms or conversions, and not the per-step rebuild of
each int4 weight as bf16 that the GEMMs need:
    ceiling tok/s = 1 / sum over linear layers of t(GEMM [rows, K] x [K, N]) / rows
It is the ceiling for prompts computed with the engine's numerics (bf16 GEMMs); 8-bit activations (llama.cpp's
choice) would change outputs and are not measured here. The burst: `--prompts` prompts made as `freehold bench
serve` makes its own (windows of the pydoc text of `--input-len` tokens, from `--seed`), prefilled together with an
empty prompt cache (max_tokens 1), `--repeats` times after a warm-up.

    freehold bench prefill                       # 16 prompts: a burst like the one 16 clients of bench serve send
    freehold bench prefill --prompts 64          # ... and 64 clients'
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch

from freehold.bench.common import write_results
from freehold.bench.serve import parse_min_max, make_prompts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=16, help="prompts in the burst (default: 16)")
    p.add_argument("--input-len", default="64,512", help="prompt tokens, min,max (default: 64,512, as bench serve)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills of the burst (default: 3)")
    p.add_argument("--gemm-rows", type=int, default=None,
                   help="rows per GEMM call of the ceiling (default: the engine's max_num_batched_tokens)")
    p.add_argument("--seed", type=int, default=0)


def linear_shapes(model: torch.nn.Module) -> Counter:
    """(K, N) -> how many of the decoder layers' linear layers have that weight shape (the LM head is left out: a
    prompt computes logits for its last row only)."""
    shapes = Counter()
    for name, module in model.named_modules():
        if name.startswith("lm_head") or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        shapes[(module.in_features, module.out_features)] += 1
    return shapes


def gemm_seconds(rows: int, k: int, n: int, repeats: int) -> float:
    """Median time of one bf16 GEMM [rows, K] x [K, N] on this machine (after one warm-up call; at least 3 timed)."""
    x, w = torch.randn(rows, k).bfloat16(), torch.randn(k, n).bfloat16()
    x @ w
    times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceiling(shapes: Counter, rows: int, repeats: int) -> tuple[float, float]:
    """-> (tokens/s of the linear layers alone at this machine's bf16 GEMM rate, that rate in GFLOP/s)."""
    seconds = sum(count * gemm_seconds(rows, k, n, repeats) for (k, n), count in shapes.items())
    flops = sum(count * 2 * k * n for (k, n), count in shapes.items()) * rows
    return rows / seconds, flops / seconds / 1e9


def run(args: argparse.Namespace) -> int:
    from freehold.llm import LLM
    from freehold.types import SamplingParams
    lo, hi = parse_min_max(args.input_len)
    if args.prompts < 1 or args.repeats < 1 or (args.gemm_rows is not None and args.gemm_rows < 1):
        raise SystemExit("--prompts, --repeats and --gemm-rows must be at least 1")
    llm = LLM(args.model, progress=False)
    print(llm.describe())
    rows_per_call = args.gemm_rows or llm.engine.config.max_num_batched_tokens
    burst = [text for text, _ in make_prompts(args.model, args.prompts, (lo, hi), args.seed)]
    params = [SamplingParams(max_tokens=1, temperature=0)] * len(burst)
    times = []
    for i in range(args.repeats + 1):  # the first prefill warms up the kernels
        llm.engine.reset_prefix_cache()
        t0 = time.perf_counter()
        generations = llm.generate(burst, params)
        times.append(time.perf_counter() - t0)
    tokens = sum(len(g.prompt_token_ids) for g in generations)
    measured = statistics.median(times[1:])
    shapes = linear_shapes(llm.engine.runner.model)
    limit, gflops = ceiling(shapes, rows_per_call, args.repeats)
    flops_per_token = sum(count * 2 * k * n for (k, n), count in shapes.items())
    rows = [["burst prefilled by the engine (measured)", tokens, measured, tokens / measured,
             flops_per_token * tokens / measured / 1e9, 1.0],
            ["linear layers alone at this machine's bf16 GEMM rate (ceiling)", tokens, tokens / limit, limit, gflops,
             limit / (tokens / measured)]]
    write_results("prefill", ["case", "prompt tokens", "seconds (= last TTFT)", "tok/s", "linear GFLOP/s",
                              "x measured"], rows,
                  extra={"prompts": args.prompts, "input_len": [lo, hi], "gemm_rows": rows_per_call,
                         "linear_flops_per_token": flops_per_token,
                         "shapes": {f"{k}x{n}": c for (k, n), c in shapes.items()}, "times": times},
                  out=args.out)
    return 0
