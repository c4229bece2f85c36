"""Sampler overhead: decode step time at batch 16 with greedy vs full sampling (temperature, top-k, top-p,
min-p, penalties), measured as forward + sample against forward alone."""
from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import Timer, write_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    from freehold.llm import LLM
    from freehold.sampling.sampler import SamplingRow, make_generator
    from freehold.types import SamplingParams
    llm = LLM(args.model, progress=False, kv_cache_memory=256 << 20)
    settings = {
        "greedy": SamplingParams(temperature=0),
        "temperature 0.8": SamplingParams(temperature=0.8),
        "top-k 50 + top-p 0.9 + min-p 0.05": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
        "all + penalties + seed": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05,
                                                 repetition_penalty=1.1, presence_penalty=0.5,
                                                 frequency_penalty=0.5, seed=1),
    }
    model = llm.loaded.model
    x = torch.randint(0, 1000, (args.batch,))
    with torch.inference_mode():
        def forward():
            h = model(x, torch.arange(args.batch))
            return model.compute_logits(h)
        logits = forward()
        fwd = []
        for _ in range(args.steps):
            with Timer() as t:
                forward()
            fwd.append(t.seconds)
    step = statistics.median(fwd)
    history = [list(range(100, 400))] * args.batch
    rows = [["forward only (batch %d)" % args.batch, step * 1000, 0.0, 0.0]]
    for name, params in settings.items():
        sampled = []
        for _ in range(args.steps):
            sample_rows = [SamplingRow(params, history[i], history[i][:50], make_generator(params.seed, "cpu"))
                           for i in range(args.batch)]
            with Timer() as t:
                llm.engine.sampler.sample(logits, sample_rows)
            sampled.append(t.seconds)
        s = statistics.median(sampled)
        rows.append([name, s * 1000, s / step * 100, (step + s) * 1000])
    write_results("sampling", ["setting", "sample ms", "% of forward", "step ms"], rows)
    return 0
