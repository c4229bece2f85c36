"""Streaming perplexity under a KV policy (`freehold eval ppl --kv-policy ...`): a long text goes through the engine
as one prompt (prompt logprobs, no generation), in chunks of `chunk` tokens, so each token is scored against
what the policy keeps:
    full       every token, the text cut at the context length
    sink       the first sink_tokens (whole blocks) + the last `window` tokens (freehold.kv.sink)
    window     the same with no sinks (sink_tokens 0): the StreamingLLM failure case
    recompute  sliding window with re-computation (the quality reference): every `chunk`-th token is scored by a
               fresh forward over the `window` tokens before it (sampled: one position per chunk)
ppl = exp(mean of -log p(x_t | what the policy kept)); KV bytes = the most blocks held x block bytes.
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
class StreamingResult:
    policy: str
    perplexity: float
    num_scored: int
    kv_bytes: int  # the most KV bytes the sequence held (recompute: one window's)
    tokens_per_second: float  # tokens streamed (recompute: tokens scored) per second
    positions: list[int]  # the scored positions and their negative log-likelihoods, for plots
    nll: list[float]


def stream_ppl(model: LlamaForCausalLM, model_config: ModelConfig, base: EngineConfig, token_ids: list[int],
               policy: str, sink_tokens: int, window: int, chunk: int) -> StreamingResult:
    if policy not in POLICIES:
        raise InvalidRequestError(f"kv policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "recompute":
        return _recompute(model, model_config, token_ids, window, chunk)
    per_token = model_config.kv_bytes_per_token(base.cache_dtype)
    context = model_config.max_position_embeddings if base.max_model_len is None else base.max_model_len
    ids = token_ids[:context] if policy == "full" else token_ids
    kept = SinkWindow.from_tokens(0 if policy == "window" else sink_tokens, window, base.block_size)
    tokens = len(ids) if policy == "full" else kept.max_cache_len  # sinks + W + E: what a sink sequence holds
    config = EngineConfig(device=base.device, dtype=base.dtype, kv_dtype=base.kv_dtype, block_size=base.block_size,
                          max_num_batched_tokens=chunk, kv_cache_memory=(tokens + base.block_size) * per_token,
                          kv_policy=KVPolicy.FULL if policy == "full" else KVPolicy.SINK,
                          sink_tokens=0 if policy == "window" else sink_tokens, window=window)
    engine = Engine(model, model_config, [], config)
    engine.add_request("text", ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
    most, scored, started = 0, None, time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            scored = out.prompt_logprobs or scored
        most = max(most, engine.pool.num_blocks - engine.pool.num_free)
    seconds = time.perf_counter() - started
    nll = [-lp.logprob for lp in scored[1:]]  # type: ignore[index]
    return StreamingResult(policy, math.exp(sum(nll) / len(nll)), len(nll), most * config.block_size * per_token,
                           len(ids) / seconds, list(range(1, len(ids))), nll)


@torch.inference_mode()
def _recompute(model: LlamaForCausalLM, model_config: ModelConfig, token_ids: list[int], window: int,
               stride: int) -> StreamingResult:
    device = next(model.parameters()).device
    positions, nll, started = [], [], time.perf_counter()
    for p in range(stride, len(token_ids), stride):
        ids = torch.tensor(token_ids[max(0, p - window):p + 1], device=device)
        hidden = model(ids[:-1], torch.arange(len(ids) - 1, device=device))
        logits = model.compute_logits(hidden[-1:])
        positions.append(p)
        nll.append(float(torch.nn.functional.cross_entropy(logits, ids[-1:])))
    seconds = time.perf_counter() - started
    return StreamingResult("recompute", math.exp(sum(nll) / len(nll)), len(nll),
                           window * model_config.kv_bytes_per_token(torch.float32), len(nll) / seconds, positions, nll)


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
        ax.plot([(x + 0.5) * bucket for x in xs], [math.exp(sum(sums[x]) / len(sums[x])) for x in xs], label=r.policy)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"perplexity (per {bucket} tokens)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
