"""Speculative decoding, n-gram (prompt lookup) and a draft model (by default the quantized self-draft: the model's own
weights at int4 drafting for its fp32 weights): decode tokens/s with speculation off and on, the same requests in the same batches, for
extractive work (repeat / summarise a 1-2K-token pydoc passage, edit a piece of code) and open-ended chat, at each
batch size. Greedy with EOS ignored and a fixed length, so both runs decode the same tokens; the bench checks that
their outputs are identical. Off and on take turns on one engine (speculation is switched per run), so drift in the
machine's speed hits both; the ratio is the median of the per-turn ratios, the tok/s columns the best turn of each.
Decode time counts the steps after every request of the batch has its first token.

At batch 1 the n-gram rows also estimate an oracle draft length: the greedy output (identical with speculation off
and on) replayed through the same proposer, each step verifying exactly the drafts that will be accepted (none
wasted, none missed) plus the bonus token, a step of T tokens costing t(T) = fixed + per_token * T from the engine's
own fit over the "on" turns' steps (freehold.spec.policy), plain decoding t(1) per token. It takes every acceptable
draft at each step, which is not proven optimal, and t is a linear fit: an estimate of what knowing the acceptances
would give, not a bound (on *repeat* the measured ratio has come within 4% of it, above and below). Batch 1 decodes
the workload's first prompt only."""
from __future__ import annotations

import argparse
import inspect
import textwrap
import time
from dataclasses import dataclass

from freehold.bench.common import write_results

PASSAGE_TOPICS = ("assert", "exceptions", "with", "lambda")  # pydoc topics of about 300-1,800 tokens
QUESTIONS = ["Write a short story about a robot who learns to paint.", "What are the benefits of regular exercise?",
             "Explain how a bicycle works to a child.", "Give me ideas for a birthday party in the garden."]


@dataclass
class Turn:
    tokens: list[list[int]]
    seconds: float
    num_tokens: int
    num_drafts: int
    num_accepted: int
    num_verifications: int

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds else 0.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default="auto", choices=["auto", "fp32", "bf16", "int8", "int4"])
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--workloads", default="repeat,summarise,code,chat", help="comma-separated")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens decoded per request")
    p.add_argument("--num-speculative-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="turns of off then on")
    p.add_argument("--kv-cache-memory", default="3G")
    p.add_argument("--methods", default="ngram,draft", help="comma-separated: ngram, draft")
    p.add_argument("--draft-target-weights", default="fp32", choices=["auto", "fp32", "bf16", "int8", "int4"],
                   help="draft method: the target's weights (default fp32)")
    p.add_argument("--draft-weights", default="int4", choices=["auto", "fp32", "bf16", "int8", "int4"],
                   help="draft method: the draft model's weights (default int4: the quantized self-draft)")
    p.add_argument("--draft-model", default=None, help="draft method: another model (default: the target's file)")


def run(args: argparse.Namespace) -> int:
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for method in args.methods.split(","):
        llm = _load(args, method, max(batches))
        workloads = {name: prompts for name, prompts in _workloads(llm).items() if name in args.workloads.split(",")}
        for name, prompts in workloads.items():
            for batch in batches:
                rows.append([method, llm.loaded.weights, name, batch, *_measure(llm, prompts, batch, args)])
                print(f"{method} {name} batch {batch}: done", flush=True)
        del llm
    write_results("spec", ["method", "target weights", "workload", "batch", "off tok/s", "on tok/s", "ratio (median)",
                           "acceptance", "mean accepted length", "same output", "oracle draft length (est.)"], rows,
                  {"max_tokens": args.max_tokens, "num_speculative_tokens": args.num_speculative_tokens,
                   "weights": args.weights, "draft_target_weights": args.draft_target_weights,
                   "draft_weights": args.draft_weights, "repeats": args.repeats}, args.out)
    return 0


def _load(args: argparse.Namespace, method: str, max_batch: int):
    from freehold.config import SpeculativeMode
    from freehold.kv.planner import parse_size
    from freehold.llm import LLM
    from freehold.quant.modes import WeightMode
    weights = args.weights if method == "ngram" else args.draft_target_weights
    return LLM(args.model, progress=False, weights=WeightMode(weights), speculative=SpeculativeMode(method),
               num_speculative_tokens=args.num_speculative_tokens, kv_cache_memory=parse_size(args.kv_cache_memory),
               max_num_seqs=max_batch, draft_model=args.draft_model, draft_weights=WeightMode(args.draft_weights))


def _measure(llm, prompts: list[list[int]], batch: int, args: argparse.Namespace) -> list:
    """[off tok/s, on tok/s, median ratio, acceptance, mean accepted length, same output, oracle estimate (n-gram at
    batch 1, else "-")] over alternating turns."""
    chosen = [prompts[i % len(prompts)] for i in range(batch)]
    pairs = [(_decode(llm, chosen, args.max_tokens, False), _decode(llm, chosen, args.max_tokens, True))
             for _ in range(args.repeats)]
    ratios = sorted(off.seconds / on.seconds for off, on in pairs)
    off = max((o for o, _ in pairs), key=lambda t: t.tokens_per_s)
    on = max((o for _, o in pairs), key=lambda t: t.tokens_per_s)
    drafts, accepted, checks = (sum(getattr(o, f) for _, o in pairs) for f in
                                ("num_drafts", "num_accepted", "num_verifications"))
    same = all(o.tokens == s.tokens for o, s in pairs)
    oracle = None
    if llm.engine.speculator.draft is None and batch == 1:  # batch > 1: prefill steps make the timed windows differ
        oracle = _oracle_ratio(chosen[0], pairs[0][0].tokens[0], llm.engine.speculator.costs.fit(),
                               args.num_speculative_tokens)
    return [off.tokens_per_s, on.tokens_per_s, ratios[len(ratios) // 2], accepted / drafts if drafts else 0.0,
            accepted / checks if checks else 0.0, "yes" if same else "NO", "-" if oracle is None else f"{oracle:.2f}"]


def _oracle_ratio(prompt: list[int], output: list[int], costs: tuple[float, float], k: int) -> float | None:
    """Plain decoding's modelled time over the oracle draft length's for the n-gram proposer (see the module's text),
    over the timed steps (the first output token comes from the prefill); None when nothing is timed."""
    from freehold.spec.ngram import NgramIndex
    fixed, per_token = costs
    seq, done, index = list(prompt) + list(output), len(prompt) + 1, NgramIndex()
    if done >= len(seq):
        return None
    plain, oracle = (len(seq) - done) * (fixed + per_token), 0.0
    while done < len(seq):
        room = min(k, len(seq) - done - 1)  # the last token is never a draft's
        draft = index.propose(lambda a, b: seq[a:b], done, room)
        accepted = next((j for j, t in enumerate(draft) if t != seq[done + j]), len(draft))
        oracle += fixed + per_token * (accepted + 1)
        done += accepted + 1
    return plain / oracle


def _workloads(llm) -> dict[str, list[list[int]]]:
    from pydoc_data.topics import topics

    def chat(text: str) -> list[int]:
        return llm.chat_prompt([{"role": "user", "content": text}])

    passages = [topics[t].strip() for t in PASSAGE_TOPICS]
    code = [textwrap.dedent(inspect.getsource(f)) for f in (textwrap.wrap, textwrap.indent, inspect.getdoc,
                                                            argparse.ArgumentParser.add_argument)]
    return {"repeat": [chat(f"Repeat the following text exactly, word for word:\n\n{p}") for p in passages],
            "summarise": [chat(f"Summarise the following text, quoting its key sentences:\n\n{p}") for p in passages],
            "code": [chat(f"Rename the variable `self` to `this` in this code and show the whole result:\n\n{c}")
                     for c in code],
            "chat": [chat(q) for q in QUESTIONS]}


def _decode(llm, prompts: list[list[int]], max_tokens: int, speculate: bool) -> Turn:
    """Greedy, EOS ignored, max_tokens each; times the steps after every request has its first token."""
    from freehold.types import SamplingParams
    engine = llm.engine
    engine.speculator.enabled = speculate
    before = engine.stats()
    ids = [f"bench-spec-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    seconds, num_tokens = 0.0, 0
    while engine.has_unfinished():
        decoding = all(tokens[rid] for rid in ids)
        t0 = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t0
        for out in outputs:
            tokens[out.request_id] += out.outputs[0].token_ids
        if decoding:
            seconds += dt
            num_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    after = engine.stats()
    return Turn([tokens[rid] for rid in ids], seconds, num_tokens, after.num_draft_tokens - before.num_draft_tokens,
                after.num_accepted_tokens - before.num_accepted_tokens,
                after.num_verifications - before.num_verifications)
