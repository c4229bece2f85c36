"""Prompt caching: a ~2,000-token shared system prompt followed by short distinct questions.
Cold = the cache is empty; warm = the system prompt's blocks are reused. Time-to-first-token = prefill time."""
from __future__ import annotations

import argparse
import statistics

from freehold.bench.common import Timer, pydoc_token_ids, write_results

QUESTIONS = ["What is a decorator?", "How do I open a file?", "Explain list comprehensions.",
             "What does the with statement do?", "What is a generator?", "How are exceptions raised?",
             "What is the difference between is and ==?", "What are keyword arguments?"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--system-tokens", type=int, default=2000)
    p.add_argument("--questions", type=int, default=8)


def ttft(llm, prompt: list[int]) -> tuple[float, int]:
    from freehold.types import SamplingParams
    with Timer() as t:
        gen = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))[0]
    return t.seconds, gen.num_cached_tokens


def run(args: argparse.Namespace) -> int:
    from freehold.llm import LLM
    llm = LLM(args.model, progress=False, kv_cache_memory=512 << 20, max_num_batched_tokens=2048)
    system = llm.tokenizer.decode(pydoc_token_ids(llm.tokenizer)[:args.system_tokens])
    prompts = [llm.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in (QUESTIONS * 4)[:args.questions]]
    ttft(llm, prompts[0])  # warm-up of the kernels, then start from an empty cache
    cold, warm, computed, reused = [], [], 0, 0
    for prompt in prompts:
        llm.engine.reset_prefix_cache()
        seconds, _ = ttft(llm, prompt)
        cold.append(seconds)
    llm.engine.reset_prefix_cache()
    ttft(llm, prompts[0])  # fills the cache with the system prompt
    for prompt in prompts[1:]:
        seconds, cached = ttft(llm, prompt)
        warm.append(seconds)
        computed += len(prompt) - cached
        reused += cached
    c, w = statistics.median(cold), statistics.median(warm)
    rows = [["cold (empty cache)", len(prompts[0]), 0, c * 1000, 1.0],
            ["warm (system prompt cached)", computed // len(warm), reused // len(warm), w * 1000, c / w]]
    write_results("prefix", ["case", "prompt tokens computed", "prompt tokens reused", "median TTFT ms",
                             "speed-up x"], rows, out=args.out)
    return 0
