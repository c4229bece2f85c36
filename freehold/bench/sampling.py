"""Sampler overhead per decode step at batch 16: sample time against the forward of the same decode step.

The denominator is a real engine decode step: `--batch` sequences, each holding a `--context`-token prompt of
pydoc text in the KV cache, one new token each. `ModelRunner.forward` (model + LM head) and `Sampler.sample` are
timed inside `Engine.step()` on the same steps, so both see the real logits and the penalties see the real
prompt and output tokens. Each setting runs its own requests (the same prompts, so after the first setting
they come from the prefix cache; EOS ignored); `--warmup` decode steps run untimed first, then the medians
over `--steps` steps are reported.

Until this version the denominator was a 16-token forward without a KV cache (cheaper than a decode step
over 16 contexts); it is still measured and printed as the last column, so figures stay comparable.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import TYPE_CHECKING

import torch

from freehold.bench.common import Timer, pydoc_token_ids, random_workload, write_results

if TYPE_CHECKING:
    from freehold.types import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=256, help="prompt tokens per sequence (in the KV cache)")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps per setting")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per setting")


def settings() -> dict[str, SamplingParams]:
    from freehold.types import SamplingParams
    return {
        "greedy": SamplingParams(temperature=0),
        "temperature 0.8": SamplingParams(temperature=0.8),
        "top-k 50 + top-p 0.9 + min-p 0.05": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
        "all + penalties + seed": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05,
                                                 repetition_penalty=1.1, presence_penalty=0.5,
                                                 frequency_penalty=0.5, seed=1),
    }


def run(args: argparse.Namespace) -> int:
    from freehold.llm import LLM
    llm = LLM(args.model, progress=False, kv_cache_memory=1 << 30, max_num_seqs=args.batch)
    corpus = pydoc_token_ids(llm.tokenizer)
    prompts = [p for p, _ in random_workload(corpus, args.batch, (args.context, args.context), (1, 1))]
    cacheless = cacheless_forward_seconds(llm, args.batch, args.steps)
    rows = []
    for name, params in settings().items():
        forward, sample = decode_step_times(llm.engine, prompts, params, args.warmup, args.steps, name)
        f, s = statistics.median(forward), statistics.median(sample)
        rows.append([name, s * 1000, s / f * 100, f * 1000, (f + s) * 1000, s / cacheless * 100])
    headers = ["setting", "sample ms", "% of decode forward", "decode forward ms", "step ms",
               f"% of {args.batch}-token cacheless forward ({cacheless * 1000:.1f} ms)"]
    write_results("sampling", headers, rows, extra={"batch": args.batch, "context": args.context,
                                                     "steps": args.steps, "cacheless_forward_ms": cacheless * 1000},
                  out=args.out)
    return 0


def decode_step_times(engine, prompts: list[list[int]], params: SamplingParams, warmup: int, steps: int,
                      tag: str) -> tuple[list[float], list[float]]:
    """Add len(prompts) requests and step until `warmup + steps` steps were full decode steps (every sequence
    decoding one token; prefill is chunked, so the first steps mix prefill and decode). Returns the forward
    and sample seconds of the last `steps` of them; the requests are aborted afterwards."""
    batch = len(prompts)
    params = dataclasses.replace(params, max_tokens=4 * (warmup + steps) + 64, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    records: list[list] = []  # [is a full decode step, forward seconds, sample seconds]
    forward, sample = engine.runner.forward, engine.sampler.sample

    def timed_forward(chunks):
        start = time.perf_counter()
        out = forward(chunks)
        records.append([len(chunks) == batch and all(c.num_tokens == 1 for c in chunks),
                        time.perf_counter() - start])
        return out

    def timed_sample(logits, rows, **options):
        start = time.perf_counter()
        out = sample(logits, rows, **options)
        records[-1].append(time.perf_counter() - start)
        return out

    engine.runner.forward, engine.sampler.sample = timed_forward, timed_sample  # instance attributes shadow
    try:
        while sum(r[0] for r in records) < warmup + steps:
            assert engine.has_unfinished(), "the requests finished before enough full decode steps"
            engine.step()
    finally:
        del engine.runner.forward, engine.sampler.sample
        for request_id in ids:
            engine.abort_request(request_id)
    decode = [r for r in records if r[0]][warmup:]
    return [r[1] for r in decode], [r[2] for r in decode]


def cacheless_forward_seconds(llm, batch: int, steps: int) -> float:
    """The old denominator: one forward of `batch` tokens at positions 0..batch-1 with no KV cache."""
    model = llm.loaded.model
    x = torch.randint(0, 1000, (batch,))
    times = []
    with torch.inference_mode():
        for _ in range(steps + 1):
            with Timer() as t:
                model.compute_logits(model(x, torch.arange(batch)))
            times.append(t.seconds)
    return statistics.median(times[1:])
