"""The quantization trade-off in one table: for each weight format and KV dtype, on the default model,
weight memory, KV bytes per token, perplexity on the pydoc text, prefill and decode tokens/s, and decode
against the memory-bandwidth roofline. llama.cpp (llama-cpp-python, same GGUF, same threads) gets a row
when it is installed.

Roofline (batch-1 decode reads every linear weight once per token, plus the KV of its context):
    bytes per token = packed bytes of all linear layers and the LM head + KV bytes/token x mean context
    roofline tok/s  = measured read bandwidth / bytes per token
The embedding lookup reads one row per token and is left out. Bandwidth is measured here, in the same process
and threads: the best of several full reads (`sum`) of a 512 MiB buffer (one thread's figure is printed too).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import dataclass

import torch

from freehold.bench.common import Timer, pydoc_token_ids, write_results
from freehold.bench.generate import freehold_timings, llama_cpp_model, llama_cpp_timings

CONFIGS = (  # (weights, KV dtype, activation dtype); the weight rows keep an fp32 KV cache, the reference's
    ("fp32", "fp32", torch.float32),  # the reference: every number as the model computes it
    ("bf16", "auto", torch.bfloat16),
    ("int8", "fp32", torch.float32),
    ("auto", "fp32", torch.float32),  # the GGUF's Q4_1 as int4
    ("auto", "auto", torch.float32),  # the default configuration: int4 weights, a bf16 KV cache on CPU
    ("auto", "int8", torch.float32),
)
HEADERS = ["weights", "KV", "weight MiB", "KV B/token", "ppl", "ppl vs fp32 %", "prefill tok/s", "decode tok/s",
           "MiB read/token", "roofline tok/s", "% of roofline"]


@dataclass(frozen=True)
class Row:
    weights: str
    kv: str
    weight_mib: float
    kv_bytes_per_token: int
    perplexity: float
    prefill_tps: float
    decode_tps: float
    bytes_per_token: float  # read per decoded token (weights + KV of the mean context)

    def cells(self, reference_ppl: float, bandwidth: float) -> list:
        roofline = bandwidth / self.bytes_per_token
        return [self.weights, self.kv, round(self.weight_mib, 1), self.kv_bytes_per_token, f"{self.perplexity:.4f}",
                f"{(self.perplexity / reference_ppl - 1) * 100:+.3f}", round(self.prefill_tps, 1),
                round(self.decode_tps, 1), round(self.bytes_per_token / 2**20, 1), round(roofline, 1),
                round(100 * self.decode_tps / roofline, 1)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--ppl-tokens", type=int, default=32768, help="perplexity over the first N pydoc tokens")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--configs", default=None,
                   help="comma-separated weights/kv pairs to run, e.g. 'fp32/fp32,auto/auto' (default: all)")


def read_bandwidth(num_bytes: int = 512 << 20, repeats: int = 7) -> float:
    """Bytes/s of one full read of a buffer larger than any cache (best of `repeats`)."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        with Timer() as t:
            x.sum()
        best = min(best, t.seconds)
    return num_bytes / best


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of every linear layer's weights (packed codes + scales), each storage counted once."""
    from freehold.quant.bf16 import Bf16Linear
    from freehold.quant.q8 import Q8Linear
    from freehold.quant.int4 import Int4Linear
    from freehold.quant.int8 import Int8Linear
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Int4Linear, Int8Linear, Bf16Linear, Q8Linear)):
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def measure_freehold(args, weights: str, kv: str, dtype: torch.dtype, ppl_ids: list[int], prompt: list[int]) -> Row:
    from freehold.config import KVDtype
    from freehold.engine.memory import create_kv_cache
    from freehold.eval.ppl import perplexity
    from freehold.llm import LLM
    from freehold.quant.modes import WeightMode
    llm = LLM(args.model, dtype=dtype, weights=WeightMode(weights), kv_dtype=KVDtype(kv),
              kv_cache_memory=64 << 20, progress=False)
    model, config = llm.loaded.model, llm.engine.config
    cache = create_kv_cache(llm.loaded.config, config, num_blocks=-(-args.window // config.block_size))
    ppl = perplexity(model, ppl_ids, args.window, args.ppl_tokens, cache=cache).perplexity
    freehold_timings(llm, prompt, args.decode_tokens)  # warm-up
    runs = [freehold_timings(llm, prompt, args.decode_tokens) for _ in range(args.repeats)]
    prefill, decode = min(r[0] for r in runs), min(r[1] for r in runs)
    mean_context = len(prompt) + args.decode_tokens / 2
    read = linear_bytes(model) + llm.engine.budget.bytes_per_token * mean_context
    label = f"auto ({str(config.cache_dtype).removeprefix('torch.')})" if kv == "auto" else kv
    return Row(weights, label, llm.loaded.weight_bytes() / 2**20, llm.engine.budget.bytes_per_token, ppl,
               len(prompt) / prefill, args.decode_tokens / decode, read)


def measure_llama_cpp(args, path, ppl_ids: list[int], prompt: list[int]) -> Row:
    """The same GGUF in llama.cpp with as many threads as torch uses; its KV cache is f16. It reads every stored
    tensor per token (the tied Q8_0 embedding is also its LM head)."""
    import numpy as np

    from freehold.models.gguf_loader import load_gguf
    gguf = load_gguf(path)
    cfg, weights = gguf.config, sum(t.data.nbytes for t in gguf.tensors.values())
    llm = llama_cpp_model(path, max(args.window, len(prompt) + args.decode_tokens + 8))
    nll, predicted = 0.0, 0
    for w in range(len(ppl_ids[:args.ppl_tokens]) // args.window):
        window = ppl_ids[w * args.window:(w + 1) * args.window]
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[:len(window) - 1], dtype=np.float32))
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum"))
        predicted += len(window) - 1
    runs = [llama_cpp_timings(llm, prompt, args.decode_tokens) for _ in range(args.repeats + 1)][1:]  # warm-up
    prefill, decode = min(r[0] for r in runs), min(r[1] for r in runs)
    kv_per_token = cfg.kv_bytes_per_token(torch.float16)
    return Row("llama.cpp", "f16", weights / 2**20, kv_per_token, math.exp(nll / predicted),
               len(prompt) / prefill, args.decode_tokens / decode,
               weights + kv_per_token * (len(prompt) + args.decode_tokens / 2))


def run(args: argparse.Namespace) -> int:
    from freehold.models.locate import resolve_model_path
    from freehold.tokenizer import Tokenizer
    path = resolve_model_path(args.model)
    tokenizer = Tokenizer.from_model_path(path)
    ids = pydoc_token_ids(tokenizer)
    ppl_ids, prompt = ids[:args.ppl_tokens], ids[:args.prompt_tokens]
    wanted = set(args.configs.split(",")) if args.configs else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = read_bandwidth()
    torch.set_num_threads(threads)
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s with {threads} threads, {one_thread / 1e9:.1f} GB/s with one")
    rows: list[Row] = []
    for weights, kv, dtype in CONFIGS:
        if wanted is None or f"{weights}/{kv}" in wanted:
            rows.append(measure_freehold(args, weights, kv, dtype, ppl_ids, prompt))
            print(rows[-1])
    if importlib.util.find_spec("llama_cpp") is not None and path.suffix == ".gguf":
        rows.append(measure_llama_cpp(args, path, ppl_ids, prompt))
    else:
        print("llama-cpp-python is not installed: no llama.cpp row")
    reference = next((r.perplexity for r in rows if (r.weights, r.kv) == ("fp32", "fp32")), rows[0].perplexity)
    write_results("quant", HEADERS, [r.cells(reference, bandwidth) for r in rows],
                  {"bandwidth_bytes_per_s": bandwidth, "one_thread_bandwidth_bytes_per_s": one_thread,
                   "ppl_tokens": args.ppl_tokens, "window": args.window,
                   "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens}, args.out)
    return 0
