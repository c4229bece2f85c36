"""Where each layer's attention goes: the share of softmax mass a prompt's first tokens receive (attention sinks).

One forward pass over the prompt, no KV cache. A probe hands every attention layer a recording stand-in for the
pass's rotary tables, so it keeps the post-RoPE queries and keys the layer attends with (the model's own tensors;
its code path is unchanged). From them the probabilities are recomputed in fp32:
    p[h, i, j] = softmax_j( q[i, h] . k[j, g(h)] / sqrt(D) )  over keys j <= i (causal),  g(h) = h // (H / KVH) (GQA)
For S sink tokens and the measured queries i in [i0, T) (i0 = 2 S by default, so the first S keys are at most half
of any measured query's context and a high share is not just "there is nothing else to look at"):
    sink share        = mean_{h, i} sum_{j < S} p[h, i, j]
    first-token share = mean_{h, i} p[h, i, 0]
    uniform share     = mean_i S / (i + 1)          the sink share if every query spread its mass evenly
    ratio             = sink share / uniform share  how many times more than uniform the first S tokens get
The heatmap is layers (rows) x heads (columns), coloured by each head's sink share: it shows which heads park
their mass on the first tokens, and how many do so in each layer.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from freehold.errors import InvalidRequestError
from freehold.layers.rotary import RopeTables
from freehold.models.llama import Attention, LlamaForCausalLM

QUERY_CHUNK = 256  # query rows per probability block: [H, 256, T] fp32 at a time, not [H, T, T]


@dataclass(frozen=True)
class LayerSinkAttention:
    layer: int
    sink_share: float  # mean over heads and measured queries of the mass on keys [0, S)
    first_token_share: float  # the same for key 0 alone
    head_sink_shares: tuple[float, ...]  # [H]: each head's sink share, averaged over the measured queries


@dataclass(frozen=True)
class SinkAttention:
    num_tokens: int  # T, the prompt's tokens
    sink_tokens: int  # S
    query_start: int  # i0: queries at positions [i0, T) are averaged
    uniform_share: float  # mean_i S / (i + 1): the same for every layer
    layers: tuple[LayerSinkAttention, ...]

    @property
    def mean_sink_share(self) -> float:
        return sum(x.sink_share for x in self.layers) / len(self.layers)

    @property
    def mean_first_token_share(self) -> float:
        return sum(x.first_token_share for x in self.layers) / len(self.layers)

    def ratio(self, share: float) -> float:
        """How many times the uniform share `share` is."""
        return share / self.uniform_share


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """q: [T, H, D], k: [T, KVH, D] (post-RoPE) -> fp32 p[h, i - start, j] for the query rows i in [start, end) over
    all T keys; 0 for keys after the query."""
    num_tokens, num_heads, head_dim = q.shape
    end = num_tokens if end is None else end
    queries = q[start:end].float().transpose(0, 1)  # [H, R, D]
    keys = k.float().repeat_interleave(num_heads // k.shape[1], dim=1).transpose(0, 1)  # [H, T, D]: head h -> g(h)
    scores = queries @ keys.transpose(1, 2) / math.sqrt(head_dim)  # [H, R, T]
    rows = torch.arange(start, end, device=q.device)[:, None]
    future = torch.arange(num_tokens, device=q.device)[None, :] > rows  # [R, T]: key j comes after query i
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def uniform_share(num_tokens: int, sink_tokens: int, query_start: int) -> float:
    """mean_{i in [i0, T)} min(S, i + 1) / (i + 1): the sink share of attention spread evenly over each context."""
    return sum(min(sink_tokens, i + 1) / (i + 1) for i in range(query_start, num_tokens)) / (num_tokens - query_start)


def layer_sink_attention(layer: int, q: torch.Tensor, k: torch.Tensor, sink_tokens: int,
                         query_start: int) -> LayerSinkAttention:
    """One layer's shares from its post-RoPE q [T, H, D] and k [T, KVH, D], QUERY_CHUNK query rows at a time."""
    num_tokens, num_heads = q.shape[:2]
    sink = torch.zeros(num_heads, dtype=torch.float64, device=q.device)  # sum over measured queries, per head
    first = torch.zeros(num_heads, dtype=torch.float64, device=q.device)
    for start in range(query_start, num_tokens, QUERY_CHUNK):
        p = causal_attention_probs(q, k, start, min(start + QUERY_CHUNK, num_tokens))  # [H, R, T]
        sink += p[:, :, :sink_tokens].sum(dim=(1, 2)).double()
        first += p[:, :, 0].sum(dim=1).double()
    num_queries = num_tokens - query_start
    heads = (sink / num_queries).tolist()
    return LayerSinkAttention(layer, sum(heads) / num_heads, float(first.mean()) / num_queries, tuple(heads))


class _RecordingRope:
    """Stands in for a forward pass's RopeTables inside one attention layer: rotates as they do, keeps the result."""

    def __init__(self, rope: RopeTables) -> None:
        self.rope = rope
        self.rotated: list[torch.Tensor] = []

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rope.apply(x)
        self.rotated.append(y)
        return y


@contextmanager
def rotated_qk_probe(model: LlamaForCausalLM,
                     on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """While open, each attention layer's forward calls on_layer(layer, q [T, H, D], k [T, KVH, D]) with the
    post-RoPE queries and keys it attends with. The hooks are removed on exit."""
    recorders: dict[int, _RecordingRope] = {}

    def before(module: Attention, args: tuple) -> tuple:
        x, rope, *rest = args
        recorders[module.layer] = _RecordingRope(rope)
        return (x, recorders[module.layer], *rest)

    def after(module: Attention, args: tuple, output: torch.Tensor) -> None:
        rotated = recorders.pop(module.layer).rotated
        width = module.num_heads + module.num_kv_heads
        if len(rotated) != 1 or rotated[0].shape[1] != width:  # the layer rotates q and k together, once
            raise RuntimeError(f"layer {module.layer}: expected one rotation of {width} q/k heads, "
                               f"saw {[tuple(t.shape) for t in rotated]}")
        on_layer(module.layer, rotated[0][:, :module.num_heads], rotated[0][:, module.num_heads:])

    attentions = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(before) for a in attentions]
    handles += [a.register_forward_hook(after) for a in attentions]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_prompt(num_tokens: int, sink_tokens: int, query_start: int, max_positions: int) -> None:
    if sink_tokens < 1:
        raise InvalidRequestError(f"sink_tokens must be at least 1, got {sink_tokens}", "sink_tokens")
    if num_tokens == 0:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if num_tokens > max_positions:
        raise InvalidRequestError(f"the prompt has {num_tokens} tokens; the model's context is {max_positions}",
                                  "prompt")
    if not 0 <= query_start < num_tokens:
        raise InvalidRequestError(f"the prompt has {num_tokens} tokens; with {sink_tokens} sink tokens the measured "
                                  f"queries start at position {query_start}, so it needs at least {query_start + 1}",
                                  "prompt")


@torch.inference_mode()
def run_prompt(model: LlamaForCausalLM, ids: Sequence[int]) -> None:
    """The prompt through the model once as one causal sequence, no KV cache."""
    device = model.model.norm.weight.device  # norms are never quantized
    model(torch.tensor(list(ids), device=device), torch.arange(len(ids), device=device))


def measure_sink_attention(model: LlamaForCausalLM, ids: Sequence[int], sink_tokens: int = 4,
                           query_start: int | None = None) -> SinkAttention:
    """Per layer, the share of attention the first `sink_tokens` of the prompt `ids` receive (see the module
    docstring); queries from position `query_start` on (default 2 x sink_tokens) are averaged."""
    query_start = 2 * sink_tokens if query_start is None else query_start
    check_prompt(len(ids), sink_tokens, query_start, model.config.max_position_embeddings)
    layers: list[LayerSinkAttention] = []

    def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        layers.append(layer_sink_attention(layer, q, k, sink_tokens, query_start))

    with rotated_qk_probe(model, on_layer):
        run_prompt(model, ids)
    return SinkAttention(len(ids), sink_tokens, query_start, uniform_share(len(ids), sink_tokens, query_start),
                         tuple(layers))


def attention_probs_per_layer(model: LlamaForCausalLM, ids: Sequence[int]) -> list[torch.Tensor]:
    """Every layer's full fp32 probabilities [H, T, T] for a short prompt (what the shares are computed from)."""
    probs: list[torch.Tensor] = []
    with rotated_qk_probe(model, lambda layer, q, k: probs.append(causal_attention_probs(q, k))):
        run_prompt(model, ids)
    return probs


def format_table(result: SinkAttention) -> str:
    s = result.sink_tokens
    lines = [f"{result.num_tokens} prompt tokens; queries at positions {result.query_start}..{result.num_tokens - 1} "
             f"averaged over them and over {len(result.layers[0].head_sink_shares)} heads",
             f"{'layer':>5}  {f'first {s}':>8}  {'token 0':>8}  {'uniform':>8}  {'x uniform':>9}"]
    rows = [(str(x.layer), x.sink_share, x.first_token_share) for x in result.layers]
    rows.append(("mean", result.mean_sink_share, result.mean_first_token_share))
    lines += [f"{name:>5}  {share:>8.4f}  {first:>8.4f}  {result.uniform_share:>8.4f}  {result.ratio(share):>9.1f}"
              for name, share, first in rows]
    return "\n".join(lines)


def save_heatmap(result: SinkAttention, path: str | Path) -> Path:
    """A PNG: layers (rows) x heads (columns), coloured by each head's share of attention on the first S tokens."""
    from matplotlib.figure import Figure  # Agg canvas through Figure.savefig; no pyplot global state
    shares = [list(x.head_sink_shares) for x in result.layers]
    num_layers, num_heads = len(shares), len(shares[0])
    fig = Figure(figsize=(1.2 + 0.45 * num_heads, 1.5 + 0.22 * num_layers))
    ax = fig.add_subplot()
    image = ax.imshow(shares, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_heads))
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 15)))
    ax.set_title(f"share of attention on the first {result.sink_tokens} tokens\n"
                 f"({result.num_tokens} tokens; uniform would give {result.uniform_share:.3f})", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
