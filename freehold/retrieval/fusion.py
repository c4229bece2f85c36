"""Reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009) of ranked lists.

    RRF(d) = sum over lists L containing d of 1 / (k + rank_L(d)),   rank starting at 1, k = 60

Only ranks count, so BM25's unbounded scores and cosine similarities need no calibration against each other; k = 60
(the paper's value) flattens the head so a document ranked well by both lists beats one ranked first by one list
only. The fused score is reported divided by its largest possible value, num_lists / (k + 1) (first in every
list), so it lies in (0, 1] and an OpenAI `score_threshold` in [0, 1] means something.
"""
from __future__ import annotations

from typing import Hashable, Sequence

RRF_K = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: int = RRF_K) -> list[tuple[Hashable, float]]:
    """Ranked lists of ids (best first) -> (id, normalized RRF score), best first; ties keep first-seen order."""
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    best = len(rankings) / (k + 1)
    return sorted(((item, s / best) for item, s in scores.items()), key=lambda pair: -pair[1])
