"""Embedding throughput: embeddings/s of Freehold's `Embedder` beside sentence-transformers on the same folder and
the same inputs (paragraphs of Python's own documentation, `pydoc_data.topics`), at batch 1 and batch 32, with the
largest |difference| between the two systems' vectors. The systems take turns (one repeat of each, then the next
round), so a slow minute on a shared machine hits both alike; the fastest repeat counts."""
from __future__ import annotations

import argparse

from freehold.bench.common import Timer, write_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a sentence-transformers folder (default: the bundled MiniLM)")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--num-inputs", type=int, default=256, help="paragraphs embedded per batch size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system; the fastest counts")
    p.add_argument("--no-sentence-transformers", action="store_true")


def paragraphs(num: int, min_chars: int = 40) -> list[str]:
    """The first `num` paragraphs (blank-line separated, at least `min_chars` long) of the pydoc topics."""
    from pydoc_data.topics import topics
    found = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            if len(text) >= min_chars:
                found.append(text)
            if len(found) == num:
                return found
    return found


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from freehold.embed import Embedder
    embedder = Embedder(args.model)
    reference = None if args.no_sentence_transformers else _sentence_transformer(embedder)
    texts = paragraphs(args.num_inputs)
    num_tokens = embedder.embed(texts).num_tokens
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
        ours, theirs = float("inf"), float("inf")
        ours_vectors = theirs_vectors = None
        for round_ in range(args.repeats + 1):  # round 0 warms both up and is not counted
            seconds, ours_vectors = _timed(lambda c: embedder.embed(c).vectors, chunks)
            ours = min(ours, seconds) if round_ else ours
            if reference is not None:
                seconds, theirs_vectors = _timed(lambda c: reference.encode(c, batch_size=batch,
                                                                            show_progress_bar=False), chunks)
                theirs = min(theirs, seconds) if round_ else theirs
        row = [batch, len(texts), sum(num_tokens) / len(texts), len(texts) / ours]
        if reference is not None:
            delta = float(np.abs(ours_vectors - theirs_vectors).max())
            row += [len(texts) / theirs, theirs / ours, delta]
        rows.append(row)
    headers = ["batch", "inputs", "mean tokens", "freehold emb/s"]
    if reference is not None:
        headers += ["sentence-transformers emb/s", "speedup", "max |delta|"]
    write_results("embed", headers, rows, {"model": embedder.name, "max_seq_length": embedder.max_seq_length,
                                           "max_batch_tokens": embedder.max_batch_tokens}, args.out)
    return 0


def _sentence_transformer(embedder):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(embedder.folder.path), device="cpu")


def _timed(embed, chunks):
    """Seconds to embed every chunk one call at a time, and the vectors (stacked in input order)."""
    import numpy as np
    with Timer() as t:
        vectors = [embed(c) for c in chunks]
    return t.seconds, np.concatenate(vectors)
