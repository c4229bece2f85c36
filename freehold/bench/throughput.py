"""Offline throughput (nano-vllm's setup scaled to a CPU): random prompts and output lengths, EOS ignored.
Freehold's batched engine vs Freehold one request at a time vs transformers generate() with static batches."""
from __future__ import annotations

import argparse

from freehold.bench.common import Timer, pydoc_token_ids, random_workload, write_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-range", default="64,512")
    p.add_argument("--output-range", default="64,256")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="step token budget (default: the engine's; runs before 2026-12-02 used 1024)")
    p.add_argument("--sequential-requests", type=int, default=8,
                   help="one-at-a-time and transformers run this many of the requests (their rate is per token)")
    p.add_argument("--hf-batch", type=int, default=8)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="auto", choices=["auto", "fp32", "int8", "int4"])
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="KV cache dtype of Freehold's rows (batched and one-at-a-time alike)")


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def run_batched(llm, work) -> float:
    from freehold.types import SamplingParams
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in work]
    with Timer() as t:
        llm.generate([p for p, _ in work], params)
    return t.seconds


def run_sequential(llm, work) -> float:
    total = 0.0
    for item in work:
        llm.engine.reset_prefix_cache()
        total += run_batched(llm, [item])
    return total


def run_transformers(model, work, batch: int) -> float:
    """Static batches: left-padded prompts, every row runs to the batch's longest output."""
    import torch
    total = 0.0
    for i in range(0, len(work), batch):
        chunk = work[i:i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        new = max(n for _, n in chunk)
        with torch.inference_mode(), Timer() as t:
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
        total += t.seconds
    return total


def run(args: argparse.Namespace) -> int:
    from freehold.config import KVDtype
    from freehold.llm import LLM
    from freehold.quant.modes import WeightMode
    budget = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    llm = LLM(args.model, progress=False, kv_cache_memory=3 << 30, max_num_seqs=args.max_num_seqs,
              weights=WeightMode(args.weights), kv_dtype=KVDtype(args.kv_dtype), **budget)
    print(llm.describe())
    work = random_workload(pydoc_token_ids(llm.tokenizer), args.num_requests, _range(args.prompt_range),
                           _range(args.output_range), args.seed)
    sub = work[:args.sequential_requests]
    rows = []
    seconds = run_batched(llm, work)
    tokens = sum(n for _, n in work)
    setup = f"weights {args.weights}, KV {args.kv_dtype}"
    rows.append([f"freehold batched ({setup})", len(work), tokens, seconds, tokens / seconds])
    seconds = run_sequential(llm, sub)
    sub_tokens = sum(n for _, n in sub)
    rows.append([f"freehold one-at-a-time ({setup})", len(sub), sub_tokens, seconds, sub_tokens / seconds])
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM
        path = llm.loaded.path
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name) if path.is_file() \
            else AutoModelForCausalLM.from_pretrained(str(path))
        seconds = run_transformers(ref.eval(), sub, args.hf_batch)
        rows.append([f"transformers static batch {args.hf_batch}", len(sub), sub_tokens, seconds,
                     sub_tokens / seconds])
    batched = rows[0][4]
    for row in rows:
        row.append(batched / row[4])
    write_results("throughput", ["system", "requests", "output tokens", "seconds", "output tok/s", "batched x"],
                  rows, {"workload": vars(args) | {"func": None, "out": str(args.out)}}, args.out)
    return 0
