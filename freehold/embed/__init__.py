"""Embeddings: BERT-family sentence-transformers folders run in plain PyTorch (`Embedder`)."""
from freehold.embed.embedder import EmbedResult, Embedder
from freehold.embed.folder import DEFAULT_EMBEDDER_NAME, default_embedder_path

__all__ = ["DEFAULT_EMBEDDER_NAME", "EmbedResult", "Embedder", "default_embedder_path"]
