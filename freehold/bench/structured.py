"""Structured-output cost: decode tokens/s at batch 1 and batch 16, with and without a JSON-schema constraint, on the
same prompts, side by side, with the grammar's share of each step (bitmask fill in the engine, mask in the sampler).

The constrained run goes first (greedy, so reruns repeat it); its per-request output lengths are then forced on the
free run (EOS ignored), so both runs decode the same number of tokens in the same batches and differ only by the
grammar. Decode time counts the steps after every request of the batch has its first token (no prefill chunks)."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from freehold.bench.common import write_results

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "documentary", "horror"]},
                   "minItems": 1, "maxItems": 3},
        "cast": {"type": "array", "items": {"type": "object",
                                            "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
                                            "required": ["name", "role"]}},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["title", "year", "genres", "cast", "rating"],
}
TOPICS = ["a space opera", "a heist", "a courtroom drama", "a cooking contest", "a haunted lighthouse",
          "a chess prodigy", "a road trip", "a volcano eruption", "a jazz band", "a mountain rescue",
          "a detective in Lima", "a robot gardener", "a pirate radio station", "a marathon runner",
          "a desert caravan", "a lost library"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default="auto", choices=["auto", "fp32", "bf16", "int8", "int4"])
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mode; the fastest counts")


def run(args: argparse.Namespace) -> int:
    from freehold.constrain.compiler import ConstraintCompiler
    from freehold.constrain.spec import JsonSchema
    from freehold.llm import LLM
    from freehold.quant.modes import WeightMode
    llm = LLM(args.model, progress=False, kv_cache_memory=512 << 20, weights=WeightMode(args.weights))
    constraint = ConstraintCompiler(llm.tokenizer, llm.loaded.config.vocab_size).compile(JsonSchema.from_value(SCHEMA))
    fill = _FillTimer(llm.engine)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [_prompt(llm, TOPICS[i % len(TOPICS)]) for i in range(batch)]
        lengths = [len(t) for t in decode_batch(llm, prompts, [args.max_tokens] * batch, constraint).tokens]
        free = min((decode_batch(llm, prompts, lengths, None) for _ in range(args.repeats)), key=lambda d: d.seconds)
        timed = []
        for _ in range(args.repeats):
            fill.reset()
            timed.append((decode_batch(llm, prompts, lengths, constraint), fill.seconds))
        constrained, fill_s = min(timed, key=lambda t: t[0].seconds)
        rows.append([batch, sum(lengths), free.tokens_per_s, constrained.tokens_per_s,
                     constrained.tokens_per_s / free.tokens_per_s,
                     100.0 * (1.0 - constrained.tokens_per_s / free.tokens_per_s),
                     1000.0 * fill_s / max(constrained.num_steps, 1)])
    write_results("structured", ["batch", "decoded tokens", "free tok/s", "constrained tok/s", "ratio",
                                 "cost %", "fill ms/step"], rows,
                  {"schema": SCHEMA, "max_tokens": args.max_tokens, "weights": args.weights}, args.out)
    return 0


def _prompt(llm, topic: str) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": f"Describe {topic} as a movie in JSON: {json.dumps(SCHEMA)}"}])


@dataclass(frozen=True)
class _Decode:
    tokens: list[list[int]]  # per request
    seconds: float  # decode-only steps
    num_tokens: int  # generated in those steps
    num_steps: int

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds


def decode_batch(llm, prompts: list[list[int]], lengths: list[int], constraint) -> _Decode:
    """Greedy generation of all prompts together; times the decode-only steps."""
    from freehold.types import SamplingParams
    engine = llm.engine
    ids = [f"bench-structured-{i}" for i in range(len(prompts))]
    for rid, prompt, n in zip(ids, prompts, lengths):
        params = SamplingParams(max_tokens=n, temperature=0.0, constraint=constraint, ignore_eos=constraint is None)
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    seconds, num_tokens, num_steps = 0.0, 0, 0
    while engine.has_unfinished():
        decoding = all(tokens[rid] for rid in ids)  # every prompt is prefilled: this step only decodes
        t0 = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t0
        for out in outputs:
            if out.error is not None:  # the bench's own grammars never dead-end: say so loudly if one does
                raise RuntimeError(f"{out.request_id} failed: {out.error}")
            tokens[out.request_id] += out.outputs[0].token_ids
        if decoding:
            seconds += dt
            num_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
            num_steps += 1
    return _Decode([tokens[rid] for rid in ids], seconds, num_tokens, num_steps)


class _FillTimer:
    """Adds up the engine's bitmask-fill time (wraps `engine.bitmasks.fill`)."""

    def __init__(self, engine):
        self.seconds = 0.0
        inner = engine.bitmasks.fill

        def timed(states):
            t0 = time.perf_counter()
            try:
                return inner(states)
            finally:
                self.seconds += time.perf_counter() - t0
        engine.bitmasks.fill = timed

    def reset(self) -> None:
        self.seconds = 0.0

