"""Streaming perplexity under a KV policy (`freehold eval ppl --kv-policy ...`): a long text goes through the engine
as one prompt (prompt logprobs, no generation), in chunks of `chunk` tokens, so each token is scored against
what the policy keeps:
    full       every token, the text cut at the context length
    sink       the first sink_tokens (whole blocks) + the last W..W+E tokens (freehold.kv.sink; E the eviction step)
    window     the same with no sinks (sink_tokens 0): the StreamingLLM failure case
    recompute  sliding window with re-computation (the quality reference), like for like with "sink": a token that
               the sink policy predicts from S sinks + the last W + j window tokens is predicted here by a fresh
               forward over the S + W + j tokens before it (no cache; positions from 0). The sink policy evicts
               before the chunk starting at p_k = S + W + E + kE, so token p_k (predicted from the state of token
               p_k - 1, which saw the full S + W + E) sees as many, and p_k + j sees S + W + j for j in 1..E: the
               tokens (p_k, p_k + E] share one forward over ids[p_k - S - W, p_k + E], and re-computation costs
               about (S + W + E) / E forward tokens per scored token; `every` scores one step of E in `every`
               (the tokens up to p_0, where no policy has evicted anything, are one forward).
ppl = exp(mean of -log p(x_t | what the policy kept)); KV bytes = the most blocks held x block bytes.
Checkpoints (e.g. 8K, 32K, 100K tokens) report, for the text up to there: ppl, the most KV bytes held so far, and
the streaming speed (tokens per second) over the segment since the previous checkpoint: flat memory and speed
with length is the sink policy's promise. `decode_speed` measures generation at each checkpoint (a sink request
whose prompt is the text up to there, timed over its generated tokens).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from freehold.config import EngineConfig, KVPolicy, ModelConfig
from freehold.engine.engine import Engine
from freehold.kv.sink import SinkWindow
from freehold.errors import InvalidRequestError
from freehold.models.llama import LlamaForCausalLM
from freehold.types import SamplingParams

POLICIES = ("full", "sink", "window", "recompute")


@dataclass(frozen=True)
class Checkpoint:
    tokens: int  # the text streamed up to here (positions 0 .. tokens-1)
    perplexity: float  # over this policy's scored positions below `tokens`
    kv_bytes: int  # the most KV bytes held so far (recompute: one forward's window)
    tokens_per_second: float  # streamed (recompute: scored) per second, over the segment since the last checkpoint


@dataclass(frozen=True)
class StreamingResult:
    policy: str
    positions: list[int]  # the scored positions and their negative log-likelihoods (for ratios and plots)
    nll: list[float]
    checkpoints: list[Checkpoint]

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.nll) / len(self.nll))

    def perplexity_at(self, positions: set[int]) -> float | None:
        """ppl over the given positions (those this policy scored); None when it scored none of them."""
        vals = [v for p, v in zip(self.positions, self.nll) if p in positions]
        return math.exp(sum(vals) / len(vals)) if vals else None


def parse_policies(text: str) -> list[str]:
    policies = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise InvalidRequestError(f"kv policy must be one of {', '.join(POLICIES)}, got {text!r}")
    return policies


def parse_checkpoints(text: str, num_tokens: int) -> list[int]:
    """'8192,32768,110000' -> sorted token counts, each cut to the text's length (duplicates dropped)."""
    try:
        values = sorted({min(int(v), num_tokens) for v in text.split(",") if v.strip()})
    except ValueError:
        raise InvalidRequestError(f"--tokens must be comma-separated token counts, got {text!r}") from None
    if not values or values[0] < 2:
        raise InvalidRequestError(f"--tokens needs counts of at least 2 tokens, got {text!r}")
    return values


def stream_ppl(model: LlamaForCausalLM, model_config: ModelConfig, base: EngineConfig, token_ids: list[int],
               policy: str, sink_tokens: int, window: int, chunk: int, checkpoints: list[int] | None = None,
               every: int = 1) -> StreamingResult:
    """Stream token_ids[:max(checkpoints)] under `policy`; `every`: recompute's stride sampling."""
    if policy not in POLICIES:
        raise InvalidRequestError(f"kv policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    checkpoints = checkpoints or [len(token_ids)]
    token_ids = token_ids[:checkpoints[-1]]
    kept = SinkWindow.from_tokens(0 if policy == "window" else sink_tokens, window, base.block_size)
    if policy == "recompute":
        return _recompute(model, model_config, token_ids, kept, every, checkpoints, base.cache_dtype)
    per_token = model_config.kv_bytes_per_token(base.cache_dtype)
    context = model_config.max_position_embeddings if base.max_model_len is None else base.max_model_len
    ids = token_ids[:context] if policy == "full" else token_ids
    tokens = len(ids) if policy == "full" else kept.max_cache_len  # sinks + W + E: what a sink sequence holds
    config = EngineConfig(device=base.device, dtype=base.dtype, kv_dtype=base.kv_dtype, block_size=base.block_size,
                          max_num_batched_tokens=chunk, kv_cache_memory=(tokens + base.block_size) * per_token,
                          kv_policy=KVPolicy.FULL if policy == "full" else KVPolicy.SINK,
                          sink_tokens=kept.num_sink_tokens, window=window)
    engine = Engine(model, model_config, [], config)
    engine.add_request("text", ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
    seq = engine.requests["text"][0]
    marks = [c for c in checkpoints if c <= len(ids)]
    progress: list[tuple[int, int, float, int]] = []  # (checkpoint, tokens done, seconds, most blocks) at each
    scored, started, done = None, time.perf_counter(), 0
    while engine.has_unfinished():
        for out in engine.step():
            scored = out.prompt_logprobs or scored
        most = engine.pool.peak_in_use
        done = len(ids) if not engine.has_unfinished() else seq.num_computed_tokens
        now = time.perf_counter() - started
        while marks and done >= marks[0]:
            progress.append((marks.pop(0), done, now, most))
    nll = [-lp.logprob for lp in scored[1:]]  # type: ignore[index]
    positions = list(range(1, len(ids)))
    rows, previous, rate = [], (0, 0.0), 0.0
    for mark, tokens_done, seconds, blocks in progress:
        if seconds > previous[1]:  # two checkpoints crossed in one step share its rate
            rate = (tokens_done - previous[0]) / (seconds - previous[1])
        rows.append(Checkpoint(mark, math.exp(sum(nll[:mark - 1]) / (mark - 1)), blocks * config.block_size * per_token,
                               rate))
        previous = (tokens_done, seconds)
    return StreamingResult(policy, positions, nll, rows)


@torch.inference_mode()
def _recompute(model: LlamaForCausalLM, model_config: ModelConfig, token_ids: list[int], kept: SinkWindow,
               every: int, checkpoints: list[int], dtype: torch.dtype) -> StreamingResult:
    """KV bytes: one forward's S + W + E tokens at the cache's element size (what a cache of that window holds)."""
    if every < 1:
        raise InvalidRequestError(f"recompute sampling must be >= 1 (one stride in N), got {every}")
    if kept.max_cache_len > model_config.max_position_embeddings:  # the same bound the engine puts on "sink"
        raise InvalidRequestError(f"recompute: sinks {kept.num_sink_tokens} + window {kept.window_tokens} + eviction "
                                  f"step {kept.evict_tokens} = {kept.max_cache_len} tokens per forward, beyond the "
                                  f"context length of {model_config.max_position_embeddings}", param="window")
    device = next(model.parameters()).device
    context, step, n = kept.num_sink_tokens + kept.window_tokens, kept.evict_tokens, len(token_ids)
    first = min(context + step + 1, n)  # tokens 1..p_0 see every token before them
    spans = [(0, 1, first)] + [(p - context, p + 1, min(p + step + 1, n))
                               for k, p in enumerate(range(context + step, n - 1, step)) if k % every == 0]
    per_token = model_config.kv_bytes_per_token(dtype)
    positions: list[int] = []
    nll: list[float] = []
    rows, marks, started, previous = [], list(checkpoints), time.perf_counter(), (0, 0.0, 0)
    for start, lo, hi in spans:  # score [lo, hi) from a fresh forward over ids[start, hi)
        while marks and lo >= marks[0]:
            rows.append(_checkpoint(marks.pop(0), positions, nll, (context + step) * per_token, started, previous))
            previous = (rows[-1].tokens, time.perf_counter() - started, len(positions))
        ids = torch.tensor(token_ids[start:hi], device=device)
        hidden = model(ids[:-1], torch.arange(len(ids) - 1, device=device))
        logits = model.compute_logits(hidden[lo - start - 1:])
        losses = torch.nn.functional.cross_entropy(logits.float(), ids[lo - start:], reduction="none")
        positions += range(lo, hi)
        nll += losses.tolist()
    while marks:
        rows.append(_checkpoint(marks.pop(0), positions, nll, (context + step) * per_token, started, previous))
        previous = (rows[-1].tokens, time.perf_counter() - started, len(positions))
    return StreamingResult("recompute", positions, nll, rows)


def _checkpoint(tokens: int, positions: list[int], nll: list[float], kv_bytes: int, started: float,
                previous: tuple[int, float, int]) -> Checkpoint:
    """previous: (tokens, seconds, positions scored) at the last checkpoint."""
    vals = [v for p, v in zip(positions, nll) if p < tokens]
    seconds = time.perf_counter() - started - previous[1]
    rate = (len(positions) - previous[2]) / max(seconds, 1e-9)
    return Checkpoint(tokens, math.exp(sum(vals) / len(vals)), kv_bytes, rate)


def decode_speed(model: LlamaForCausalLM, model_config: ModelConfig, base: EngineConfig, token_ids: list[int],
                 sink_tokens: int, window: int, checkpoints: list[int],
                 span: int = 512) -> list[tuple[int, float, int]]:
    """Decode speed of a sink sequence at each checkpoint c: one greedy request with the prompt token_ids[:c]
    (streamed through the sink policy) generating `span` tokens, timed from its first generated token to its
    last. Returns (c, decode tok/s, the most KV bytes the request held) per checkpoint."""
    per_token = model_config.kv_bytes_per_token(base.cache_dtype)
    kept = SinkWindow.from_tokens(sink_tokens, window, base.block_size)
    config = EngineConfig(device=base.device, dtype=base.dtype, kv_dtype=base.kv_dtype, block_size=base.block_size,
                          kv_cache_memory=(kept.max_cache_len + base.block_size) * per_token,
                          kv_policy=KVPolicy.SINK, sink_tokens=kept.num_sink_tokens, window=window)
    engine = Engine(model, model_config, [], config)
    engine.add_request("warm-up", token_ids[:64], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():  # the first decode steps of a process are slower: keep them out of the rows
        engine.step()
    rows = []
    for c in checkpoints:
        engine.add_request(f"decode-{c}", token_ids[:c], SamplingParams(max_tokens=span, temperature=0.0,
                                                                         ignore_eos=True))
        seq = engine.requests[f"decode-{c}"][0]
        first, engine.pool.peak_in_use = None, 0
        while engine.has_unfinished():
            engine.step()
            if first is None and seq.output_token_ids:
                first = time.perf_counter()  # the prompt is done: decoding starts here
        held = engine.pool.peak_in_use * config.block_size * per_token
        rows.append((c, (span - 1) / (time.perf_counter() - first), held))
    return rows


def plot(results: list[StreamingResult], path: str, bucket: int = 256) -> None:
    """ppl against position, one line per policy (mean NLL over buckets of `bucket` positions)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        sums: dict[int, list[float]] = {}
        for p, v in zip(r.positions, r.nll):
            sums.setdefault(p // bucket, []).append(v)
        xs = sorted(sums)
        ax.plot([(x + 0.5) * bucket for x in xs], [math.exp(sum(sums[x]) / len(sums[x])) for x in xs], label=r.policy,
                marker="." if r.policy == "recompute" else None, linestyle="none" if r.policy == "recompute" else "-")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"perplexity (per {bucket} tokens)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
