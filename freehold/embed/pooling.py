"""Token vectors -> one vector per sequence, as sentence-transformers' Pooling and Normalize modules compute it.

Input is the packed layout of `freehold.embed.bert` (a bucket's real tokens end to end, [T, H]) with each token's
sequence number, so padding never enters a sum or a max.

    mean:  v_b = (1 / n_b) * sum over the n_b tokens t of sequence b of x_t
    cls:   v_b = x_(first token of b)
    max:   v_b[j] = max over tokens t of b of x_t[j]
    normalize:  v_b / max(||v_b||_2, 1e-12)      (torch.nn.functional.normalize, as sentence-transformers)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from freehold.embed.folder import Pooling


def pool(hidden: torch.Tensor, lengths: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """hidden [T, H] (sequences end to end, lengths [B] summing to T) -> [B, H]."""
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths)  # [T]
    if mode is Pooling.CLS:
        starts = torch.cumsum(lengths, 0) - lengths
        return hidden[starts]
    out = hidden.new_zeros(lengths.numel(), hidden.shape[1])
    if mode is Pooling.MEAN:
        out.index_add_(0, seq, hidden)
        return out / lengths.to(hidden.dtype)[:, None]
    return out.scatter_reduce_(0, seq[:, None].expand_as(hidden), hidden, "amax", include_self=False)


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors, p=2, dim=1)
