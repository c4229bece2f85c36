"""`freehold bench vectors`: the dense index at scale, on synthetic 384-d unit vectors.

Real sentence embeddings are not uniform on the sphere: they cluster by topic. The vectors here are drawn from a
mixture of `--clusters` Gaussian blobs (a uniformly random unit center plus isotropic noise of norm about
`--spread`, then normalized); queries are fresh draws from the same mixture, never stored vectors. Reported:
build time of the HNSW graph (usearch, all cores), memory per vector (usearch's own count: the f32 vector plus
its graph links), top-10 query latency p50/p99 one query at a time, and recall@10 against an exact search
(numpy matmul over every vector).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

HEADERS = ["vectors", "dim", "build s", "vectors/s", "bytes/vector", "p50 ms", "p99 ms", "recall@10"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-vectors", type=int, default=100_000, help="stored vectors (the scale target: 1000000)")
    p.add_argument("--num-queries", type=int, default=200)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.5, help="noise norm around each cluster center")
    p.add_argument("--repeats", type=int, default=5, help="latency: each query this many times")
    p.add_argument("--seed", type=int, default=0)


def clustered_unit_vectors(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float) -> np.ndarray:
    """n draws: a random center + Gaussian noise with expected norm `spread`, normalized to length 1."""
    out = np.empty((n, centers.shape[1]), np.float32)
    for start in range(0, n, 100_000):  # in blocks: the float64 temporaries stay small
        m = min(100_000, n - start)
        v = centers[rng.integers(0, len(centers), m)] + rng.standard_normal((m, centers.shape[1])) * (
            spread / np.sqrt(centers.shape[1]))
        out[start:start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def exact_top10(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    scores = queries @ vectors.T  # [queries, vectors]
    top = np.argpartition(-scores, 9, axis=1)[:, :10]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)


def run(args: argparse.Namespace) -> int:
    from freehold.bench.common import write_results
    from freehold.retrieval.dense import DenseIndex
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vectors = clustered_unit_vectors(rng, centers, args.num_vectors, args.spread)
    queries = clustered_unit_vectors(rng, centers, args.num_queries, args.spread)
    index = DenseIndex(args.dim, threshold=0)  # always the HNSW graph
    t0 = time.perf_counter()
    index.add(np.arange(args.num_vectors, dtype=np.int64), vectors)
    build_s = time.perf_counter() - t0
    truth = exact_top10(vectors, queries)
    latencies, found = [], []
    for repeat in range(args.repeats):
        for q, query in enumerate(queries):
            t = time.perf_counter()
            hits = index.search(query, 10)
            latencies.append((time.perf_counter() - t) * 1000)
            if repeat == 0:
                found.append(len(set(hits.keys.tolist()) & set(truth[q].tolist())) / 10)
    row = [args.num_vectors, args.dim, build_s, args.num_vectors / build_s, index._ann.memory_usage / args.num_vectors,
           float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), float(np.mean(found))]
    write_results(f"vectors_{args.num_vectors}", HEADERS, [row],
                  {"clusters": args.clusters, "spread": args.spread, "queries": args.num_queries,
                   "repeats": args.repeats, "connectivity": index._ann.connectivity,
                   "expansion_add": index._ann.expansion_add, "expansion_search": index._ann.expansion_search},
                  args.out)
    return 0
