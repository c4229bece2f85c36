"""`freehold eval retrieval`: retrieval quality and speed on a BEIR folder (corpus.jsonl, queries.jsonl,
qrels/test.tsv), for BM25, dense and hybrid search through a real `VectorStore`.

Each document is one file of the store (title + " " + text, as BEIR reads it), chunked with OpenAI's default
strategy (800 tokens / 400 overlap: nearly every BEIR document is one chunk); a document's rank is that of its best
chunk. Every test query asks for 100 results. The metrics (nDCG@10, Recall@100, MRR@10) come from `ir-measures`
(pytrec_eval underneath), the official implementations BEIR also uses. Latency is one query at a time, end to
end through `VectorStore.search` (embedding the query included for dense and hybrid).
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from freehold.errors import InvalidRequestError
from freehold.retrieval.corpus import read_beir_jsonl
from freehold.retrieval.records import SearchMode
from freehold.retrieval.store import Embedding, VectorStore

DEPTH = 100
HEADERS = ["mode", "nDCG@10", "Recall@100", "MRR@10", "p50 ms", "p99 ms", "queries"]


@dataclass(frozen=True)
class ModeReport:
    mode: str
    ndcg_10: float
    recall_100: float
    mrr_10: float
    p50_ms: float
    p99_ms: float
    num_queries: int

    def row(self) -> list:
        return [self.mode, self.ndcg_10, self.recall_100, self.mrr_10, self.p50_ms, self.p99_ms, self.num_queries]


@dataclass(frozen=True)
class BuildReport:
    num_docs: int
    num_chunks: int
    seconds: float

    @property
    def docs_per_second(self) -> float:
        return self.num_docs / self.seconds


def read_queries(data: Path, split: str = "test") -> tuple[dict[str, str], list]:
    """The queries that have judgments in qrels/<split>.tsv, and those judgments as ir_measures Qrels."""
    import ir_measures
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (data / name).is_file():
            raise InvalidRequestError(f"{data} is not a BEIR folder: {name} is missing", param="data")
    with open(data / f"qrels/{split}.tsv", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and r[0] != "query-id"]
    qrels = [ir_measures.Qrel(r[0], r[1], int(r[2])) for r in rows]
    wanted = {q.query_id for q in qrels}
    with open(data / "queries.jsonl", encoding="utf-8") as f:
        queries = {q["_id"]: q["text"] for q in map(json.loads, f) if q["_id"] in wanted}
    return queries, qrels


def parse_modes(text: str) -> list[SearchMode]:
    names = [m for m in text.split(",") if m]
    unknown = [m for m in names if m not in {mode.value for mode in SearchMode}]
    if unknown or not names:
        raise InvalidRequestError(f"--modes: one or more of bm25, dense, hybrid, got {text!r}", param="modes")
    return [SearchMode(m) for m in names]


def open_or_build_store(data: Path, directory: Path, embedder: Embedding,
                        progress: Callable[[int, int], None] | None = None
                        ) -> tuple[VectorStore, BuildReport | None]:
    """A store already in `directory` (built from `data` before) is searched as it is: no build to report."""
    if (directory / "store.sqlite").is_file():
        return VectorStore(directory, embedder), None
    return build_store(data, directory, embedder, progress)


def build_store(data: Path, directory: Path, embedder: Embedding,
                progress: Callable[[int, int], None] | None = None) -> tuple[VectorStore, BuildReport]:
    files = read_beir_jsonl(data / "corpus.jsonl")
    store = VectorStore(directory, embedder, create=True, name=data.name)
    t0 = time.perf_counter()
    store.add_files(files, progress)
    seconds = time.perf_counter() - t0
    return store, BuildReport(len(files), _num_chunks(store), seconds)


def _num_chunks(store: VectorStore) -> int:
    return sum(f.num_chunks for f in store.list_files())


def run_queries(store: VectorStore, queries: dict[str, str], mode: SearchMode) -> tuple[list, list[float]]:
    """(ir_measures ScoredDocs, latency ms per query): a document scores as its best chunk."""
    import ir_measures
    run, latencies = [], []
    for query_id, text in queries.items():
        t0 = time.perf_counter()
        result = store.search(text, mode, DEPTH)
        latencies.append((time.perf_counter() - t0) * 1000)
        seen: set[str] = set()
        for rank, hit in enumerate(result.hits):
            if hit.file_id not in seen:
                seen.add(hit.file_id)
                run.append(ir_measures.ScoredDoc(query_id, hit.file_id, float(DEPTH - rank)))  # rank order
    return run, latencies


def evaluate_mode(store: VectorStore, queries: dict[str, str], qrels: list, mode: SearchMode) -> ModeReport:
    import ir_measures
    from ir_measures import RR, R, nDCG
    run, latencies = run_queries(store, queries, mode)
    scores = ir_measures.calc_aggregate([nDCG @ 10, R @ 100, RR @ 10], qrels, run)
    return ModeReport(mode.value, scores[nDCG @ 10], scores[R @ 100], scores[RR @ 10],
                      float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), len(queries))
