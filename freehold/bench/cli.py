"""`freehold bench NAME`: each benchmark is a module in freehold/bench/ with `add_arguments(parser)` and `run(args)`.
Heavy imports (transformers, the model) happen inside `run`. Results go to `--out` (default ./bench-results/)."""
from __future__ import annotations

import argparse
from pathlib import Path

from freehold.bench import (embed, generate, prefill, prefix, quant, sampling, serve, spec, step, structured,
                            throughput, tools, vectors)
from freehold.bench.common import DEFAULT_RESULTS_DIR

BENCHMARKS = {
    "generate": (generate, "single-stream prefill/decode tokens/s vs transformers"),
    "throughput": (throughput, "batched engine vs one-at-a-time vs transformers static batches"),
    "prefill": (prefill, "a burst of prompts prefilled together vs this machine's bf16 GEMM ceiling for it"),
    "prefix": (prefix, "prompt caching: cold vs warm time-to-first-token"),
    "quant": (quant, "weight formats x KV dtypes: memory, perplexity, prefill/decode tok/s, bandwidth roofline"),
    "sampling": (sampling, "sampler overhead per decode step at batch 16"),
    "structured": (structured, "constrained (JSON schema) vs free decode tokens/s at batch 1 and 16"),
    "tools": (tools, "constrained tool-call turn vs free text: decode tokens/s at batch 1 and 16"),
    "serve": (serve, "HTTP load generator against freehold serve (TTFT, ITL, output tokens/s)"),
    "vectors": (vectors, "dense index at scale: build time, bytes/vector, top-10 p50/p99, recall@10 vs exact"),
    "spec": (spec, "speculative decoding (n-gram) off vs on: decode tok/s, acceptance, on extractive and chat work"),
    "step": (step, "where one decode step's time goes at batch 1 and 64: matmuls, lm head, attention, sampling ..."),
    "embed": (embed, "embeddings/s vs sentence-transformers at batch 1 and 32, with the vectors' max |delta|"),
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        parser = sub.add_parser(name, help=help_text)
        module.add_arguments(parser)
        parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR,
                            help=f"folder for NAME.json and NAME.md (default: ./{DEFAULT_RESULTS_DIR}/)")


def run_bench(args: argparse.Namespace) -> int:
    module, _ = BENCHMARKS[args.bench_command]
    return module.run(args) or 0
