"""Freehold: a self-hosted LLM inference server and runtime."""
from freehold.embed import EmbedResult, Embedder
from freehold.llm import LLM, Completion, Generation
from freehold.types import FinishReason, SamplingParams

__all__ = ["LLM", "Completion", "EmbedResult", "Embedder", "FinishReason", "Generation", "SamplingParams"]
