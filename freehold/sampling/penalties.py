"""Logit penalties and masks: the stages that run before temperature, as pure tensor functions.

Every function takes the batch's logits [B, V] (fp32) and returns new logits [B, V]; none mutates its
input. The tokens a penalty touches travel as flat indices key = row * V + token into the logits, with the
penalty of each (one number when every row shares it), so a step costs one copy of the logits plus work
proportional to the number of prompt and output tokens, not to B * V. Token ids are packed with `array`
(a C loop) rather than torch.tensor on a list, which checks every element's type.
"""
from __future__ import annotations

import array
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch

NEG_INF = float("-inf")

PerKey = Union[float, torch.Tensor]  # one value for every key, or a float32 tensor [N] (one per key)


class Penalized(NamedTuple):
    """The tokens one penalty touches, as flat keys row * V + token id into the logits, with its parameters."""
    keys: torch.Tensor  # long [N]
    counts: torch.Tensor | None  # long [N] occurrences of each (distinct) key; None: keys may repeat
    values: tuple[PerKey, ...]  # the penalty's parameters for the row of each key


def token_keys(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Flat keys row * V + id of every token in every row (token_ids[b]: the ids of batch row b)."""
    ids, offsets = array.array("q"), array.array("q")
    for row, row_ids in enumerate(token_ids):
        if isinstance(row_ids, list):
            ids.fromlist(row_ids)
        else:
            ids.extend(row_ids)
        offsets.extend(array.array("q", [row * vocab_size]) * len(row_ids))
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=device)
    return (torch.frombuffer(ids, dtype=torch.long) + torch.frombuffer(offsets, dtype=torch.long)).to(device)


def per_key(values: Sequence[float], active: Sequence[bool], keys: torch.Tensor, vocab_size: int) -> PerKey:
    """The parameter of each key's row: one float when every active row shares it, else a tensor [N]."""
    shared = {v for v, on in zip(values, active) if on}
    if len(shared) <= 1:
        return shared.pop() if shared else 0.0
    return torch.tensor(values, dtype=torch.float32, device=keys.device)[keys // vocab_size]


def apply_penalties(logits: torch.Tensor, seen: Penalized | None, counted: Penalized | None,
                    in_place: bool = False) -> torch.Tensor:
    """Repetition penalty (HF / vLLM / CTRL rule) on tokens seen in prompt or output, then presence and
    frequency penalties (OpenAI rule) on generated tokens:
        seen (values = (r,)):                     l' = l / r  if l > 0,  l * r  otherwise
        counted c > 0 (values = (presence, frequency)):  l' = l - frequency * c - presence
    r > 1 makes a seen token less likely whatever the sign of its logit. Other tokens keep their logit, as
    under the dense rule with c = 0; a key seen twice is written twice with the same value. `in_place` writes
    into `logits` itself (the caller's copy is not needed again); otherwise a copy is returned."""
    out = logits if in_place else logits.clone()
    flat = out.view(-1)
    if seen is not None and seen.keys.numel():
        value, (r,) = flat[seen.keys], seen.values
        flat[seen.keys] = torch.where(value > 0, value / r, value * r)
    if counted is not None and counted.keys.numel():
        presence, frequency = counted.values
        flat[counted.keys] = flat[counted.keys] - frequency * counted.counts - presence
    return out


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """l[r, t] += bias, for each (r, t, bias) triple (OpenAI `logit_bias`)."""
    return logits.index_put((rows, tokens), bias.to(logits.dtype), accumulate=True)


def mask_tokens(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """l[r, t] = -inf, for each (r, t) pair (used to hold back EOS / stop ids until min_tokens)."""
    return logits.index_put((rows, tokens), torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device))


def apply_allowed_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """l[b, t] = -inf where allowed[b, t] is False (constrained decoding)."""
    return logits.masked_fill(~allowed, NEG_INF)
