"""`HybridRecall`: hybrid retrieval over one conversation's own history (and a namespace's memories), indexed as it
grows: the `Recall` that freehold.memory.context asks for the memory block.

Each added text (a message, or an explicit memory) is cut into passages of whole sentences, up to
`max_passage_tokens` each (a longer sentence is cut at words). Passages are ranked by BM25 (freehold.retrieval.bm25:
the same tokenizer and Lucene BM25) and, when an `embed` function is given, by cosine similarity of its vectors
(all-MiniLM-L6-v2 in the server), fused by reciprocal rank fusion (freehold.retrieval.fusion). Passages are
tokenized and embedded once, when added; the BM25 index is rebuilt from the cached tokens at the first search
after an add (bm25s has no incremental add). Not thread-safe: one caller at a time (the server holds the
conversation's lock).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import bm25s
import numpy as np

from freehold.memory.context import Counter, Passage
from freehold.retrieval.bm25 import B, K1, BM25Index, tokenize
from freehold.retrieval.fusion import reciprocal_rank_fusion

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> float32 [n, dim], L2-normalized
MAX_PASSAGE_TOKENS = 64
DEPTH = 20  # candidates each ranking contributes to the fusion
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class _Indexed:
    passage: Passage
    terms: list[str]


class HybridRecall:
    def __init__(self, count: Counter, embed: Embed | None = None, max_passage_tokens: int = MAX_PASSAGE_TOKENS):
        self.count = count
        self.embed = embed
        self.max_passage_tokens = max_passage_tokens
        self._passages: list[_Indexed] = []
        self._sources: set[str] = set()
        self._vectors: list[np.ndarray] = []
        self._bm25: BM25Index | None = None

    def __len__(self) -> int:
        return len(self._passages)

    def __contains__(self, source_id: str) -> bool:
        return source_id in self._sources

    def add(self, source_id: str, text: str) -> None:
        """Index `text` under `source_id` (a source added before is skipped: items do not change)."""
        if source_id in self._sources:
            return
        self._sources.add(source_id)
        pieces = split_passages(text, self.count, self.max_passage_tokens)
        if not pieces:
            return
        terms = tokenize(pieces)
        self._passages += [_Indexed(Passage(source_id, p, self.count(p)), t) for p, t in zip(pieces, terms)]
        if self.embed is not None:
            self._vectors.append(np.asarray(self.embed(pieces), np.float32))
        self._bm25 = None

    def search(self, query: str, allowed: set[str]) -> list[Passage]:
        """Passages of `allowed` sources, best first (RRF of the BM25 and dense rankings, each `DEPTH` deep)."""
        keep = np.array([p.passage.source_id in allowed for p in self._passages], dtype=bool)
        if not keep.any() or not query.strip():
            return []
        rankings = [_top(self._bm25_index().scores(query), keep, positive_only=True)]
        if self.embed is not None:
            vectors = np.concatenate(self._vectors)
            rankings.append(_top(vectors @ np.asarray(self.embed([query]), np.float32)[0], keep))
        fused = reciprocal_rank_fusion([r for r in rankings if r])
        return [self._passages[i].passage for i, _ in fused]  # type: ignore[index]

    def _bm25_index(self) -> BM25Index:
        if self._bm25 is None:
            retriever = bm25s.BM25(method="lucene", k1=K1, b=B)
            retriever.index([p.terms or [""] for p in self._passages], show_progress=False)
            self._bm25 = BM25Index(retriever, len(self._passages))
        return self._bm25


def _top(scores: np.ndarray, keep: np.ndarray, positive_only: bool = False) -> list[int]:
    scores = np.where(keep, scores, -np.inf)
    if positive_only:
        scores = np.where(scores > 0, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:DEPTH]
    return [int(i) for i in order if np.isfinite(scores[i])]


def split_passages(text: str, count: Counter, max_tokens: int) -> list[str]:
    """Whole sentences packed into passages of at most `max_tokens` (as `count` counts the joined text); a sentence
    longer than that is cut at words."""
    out: list[str] = []
    current = ""
    for sentence in _pieces(text, count, max_tokens):
        joined = f"{current} {sentence}" if current else sentence
        if current and count(joined) > max_tokens:
            out.append(current)
            joined = sentence
        current = joined
    return out + [current] if current else out


def _pieces(text: str, count: Counter, max_tokens: int) -> list[str]:
    pieces = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        if count(sentence) <= max_tokens:
            pieces.append(sentence)
            continue
        words, current = sentence.split(), ""
        for word in words:
            joined = f"{current} {word}" if current else word
            if current and count(joined) > max_tokens:
                pieces.append(current)
                joined = word
            current = joined
        pieces.append(current)
    return pieces
