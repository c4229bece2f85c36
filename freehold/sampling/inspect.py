"""Look at a next-token distribution as the sampler reshapes it: top tokens, entropy, effective candidates.

For each temperature the logits go through `transform_probs` (temperature -> top-k -> top-p -> min-p),
the exact distribution the sampler draws from. Summary numbers:
    entropy H = -sum_i p_i ln p_i  (nats; bits = H / ln 2)
    effective number of candidates = exp(H)  (k for a uniform distribution over k tokens, 1 for greedy)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from freehold.sampling.transforms import transform_probs


class TokenProb(NamedTuple):
    token_id: int
    text: str
    prob: float


class DistributionSummary(NamedTuple):
    temperature: float
    top_k: int | None
    top_p: float
    min_p: float
    top_tokens: tuple[TokenProb, ...]  # most likely first
    entropy_nats: float
    entropy_bits: float
    effective_candidates: float  # exp(entropy_nats)
    num_nonzero: int  # tokens with probability > 0 after filtering


def entropy_nats(probs: torch.Tensor) -> float:
    """H = -sum_{p_i > 0} p_i ln p_i (clamped at 0 against rounding and -0.0)."""
    p = probs[probs > 0].double()
    return max(0.0, float(-(p * p.log()).sum()))


def summarize(probs: torch.Tensor, decode: Callable[[int], str], top_n: int, temperature: float,
              top_k: int | None, top_p: float, min_p: float) -> DistributionSummary:
    values, ids = probs.topk(min(top_n, int((probs > 0).sum())))  # filtered-out tokens are not listed
    tokens = tuple(TokenProb(int(t), decode(int(t)), float(v)) for t, v in zip(ids.tolist(), values.tolist()))
    h = entropy_nats(probs)
    return DistributionSummary(temperature, top_k, top_p, min_p, tokens, h, h / math.log(2), math.exp(h),
                               int((probs > 0).sum()))


def inspect_distribution(logits_1d: torch.Tensor, tokenizer_decode: Callable[[int], str],
                         temperatures: Sequence[float], top_p: float = 1.0, min_p: float = 0.0,
                         top_n: int = 10, top_k: int | None = None) -> list[DistributionSummary]:
    """One summary per temperature of the reshaped next-token distribution of logits_1d [V]."""
    logits = logits_1d.detach().float().cpu()
    return [summarize(transform_probs(logits, t, top_k, top_p, min_p), tokenizer_decode, top_n, t, top_k, top_p, min_p)
            for t in temperatures]


def format_table(results: Sequence[DistributionSummary]) -> str:
    """A plain-text table: one block per setting, with its top tokens and probabilities."""
    blocks = []
    for r in results:
        header = (f"temperature={r.temperature:g} top_k={r.top_k if r.top_k is not None else 'all'} "
                  f"top_p={r.top_p:g} min_p={r.min_p:g} | entropy {r.entropy_nats:.3f} nats "
                  f"({r.entropy_bits:.3f} bits) | effective candidates {r.effective_candidates:.2f} "
                  f"| nonzero {r.num_nonzero}")
        lines = [header, f"  {'rank':>4}  {'token_id':>8}  {'prob':>8}  text"]
        lines += [f"  {rank:>4}  {t.token_id:>8}  {t.prob:>8.4f}  {t.text!r}"
                  for rank, t in enumerate(r.top_tokens, start=1)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def save_chart(results: Sequence[DistributionSummary], path: str | Path) -> Path:
    """A PNG with one horizontal bar panel per setting (top tokens, most likely on top)."""
    from matplotlib.figure import Figure  # Agg canvas through Figure.savefig; no pyplot global state

    n = max(len(results), 1)
    slots = max((len(r.top_tokens) for r in results), default=1)  # same bar height in every panel
    fig = Figure(figsize=(4.0 * n, 0.35 * slots + 1.8))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, r in zip(axes, results):
        ys = [slots - 1 - rank for rank in range(len(r.top_tokens))]  # most likely on top
        ax.barh(ys, [t.prob for t in r.top_tokens], color="tab:blue")
        ax.set_yticks(ys, [repr(t.text) for t in r.top_tokens], fontsize=8)
        ax.set_ylim(-0.5, slots - 0.5)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("probability")
        ax.set_title(f"T={r.temperature:g}  H={r.entropy_bits:.2f} bits  eff={r.effective_candidates:.1f}",
                     fontsize=9)
    if results:
        r = results[0]
        fig.suptitle(f"top_k={r.top_k if r.top_k is not None else 'all'}  top_p={r.top_p:g}  min_p={r.min_p:g}",
                     fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png", dpi=100)
    return out
