"""Freehold: a self-hosted LLM inference server and runtime."""
import os

# How long an idle OpenMP worker spins before it sleeps, read once when torch loads libgomp (so only where freehold is
# imported first, as its CLI and server are; an explicit setting wins). libgomp's default (300,000 spins, several ms)
# let a worker spin through the Python between decode steps, and under CPU contention (grammar compiles on other
# threads) a spinning barrier made a plain request several times slower; 10,000 spins still bridge the gaps between
# a step's kernel calls. See release_openmp_threads in freehold/kernels/native.py and docs/performance.md (issue 19).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from freehold.embed import EmbedResult, Embedder  # noqa: E402
from freehold.llm import LLM, Completion, Generation  # noqa: E402
from freehold.types import FinishReason, SamplingParams  # noqa: E402

__all__ = ["LLM", "Completion", "EmbedResult", "Embedder", "FinishReason", "Generation", "SamplingParams"]
