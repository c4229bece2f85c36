"""`Embedder`: texts (or token ids) -> one vector each, from a BERT-family sentence-transformers folder.

    embedder = Embedder()                    # the bundled all-MiniLM-L6-v2
    result = embedder.embed(["a query", "a passage"])
    result.vectors        # float32 [2, 384], L2-normalized (the folder has a Normalize module)
    result.truncated      # [False, False]: inputs longer than max_seq_length (256) are cut, and flagged here

The vectors match sentence-transformers' on the same folder (tests/integration/test_embed_parity.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from freehold.embed.batching import plan_buckets
from freehold.embed.bert import load_bert, pack
from freehold.embed.folder import DEFAULT_EMBEDDER_ALIASES, read_folder
from freehold.embed.pooling import normalize, pool
from freehold.embed.tokens import EmbedTokenizer, Encoded
from freehold.errors import InvalidRequestError, ModelLoadError


@dataclass
class EmbedResult:
    vectors: np.ndarray  # float32 [N, dim], in input order, L2-normalized iff the embedder normalizes
    num_tokens: list[int]  # tokens used per input (after truncation, special tokens included)
    truncated: list[bool]  # per input: was it cut at max_seq_length


class Embedder:
    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_tokens: int = 16384):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} was asked for, but this torch has no CUDA device")
        folder = read_folder(path)
        self.folder = folder
        self.name = folder.name
        self.aliases = DEFAULT_EMBEDDER_ALIASES if path is None else ()
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self.model = load_bert(folder.path / "config.json", folder.weights, self.device, dtype)
        self.dim = self.model.cfg.hidden_size
        self.normalize = folder.normalize
        self.max_seq_length = min(folder.max_seq_length or self.model.cfg.max_position_embeddings,
                                  self.model.cfg.max_position_embeddings)
        self.tokenizer = EmbedTokenizer(folder.path / "tokenizer.json", self.max_seq_length, folder.do_lower_case)

    # -- tokens ---------------------------------------------------------------------------------------------------
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text has, special tokens included, before truncation."""
        return [e.num_tokens_full for e in self.tokenizer.encode(list(texts))] if texts else []

    def encode_tokens(self, text: str) -> list[int]:
        """The text's ids without special tokens (for chunking by tokens)."""
        return self.tokenizer.content_ids([text])[0]

    def decode_tokens(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- vectors --------------------------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str] | Sequence[Sequence[int]]) -> EmbedResult:
        """One vector per input, in input order. Inputs are texts, or token ids without special tokens (all of one
        kind); an empty list, an empty text or an id outside the vocabulary is an InvalidRequestError on `input`."""
        return self.embed_encoded(self.tokenize(texts))

    def tokenize(self, texts: Sequence[str] | Sequence[Sequence[int]]) -> list[Encoded]:
        """The checks and tokenization of `embed`, alone (the server tokenizes each request before merging)."""
        return self.tokenizer.encode(_checked_inputs(texts))

    def embed_encoded(self, encoded: Sequence[Encoded]) -> EmbedResult:
        """Vectors of already tokenized inputs, bucket by bucket, back in input order."""
        out = torch.empty(len(encoded), self.dim, dtype=torch.float32)
        with torch.inference_mode():
            for bucket in plan_buckets([len(e.ids) for e in encoded], self.max_batch_tokens):
                out[bucket] = self._forward([encoded[i].ids for i in bucket]).float().cpu()
        return EmbedResult(out.numpy(), [len(e.ids) for e in encoded], [e.truncated for e in encoded])

    def _forward(self, sequences: list[list[int]]) -> torch.Tensor:
        batch = pack(sequences, self.device)
        vectors = pool(self.model(batch), batch.lengths, self.folder.pooling)  # [B, dim]
        return normalize(vectors) if self.normalize else vectors


def _checked_inputs(inputs: Sequence[str] | Sequence[Sequence[int]]) -> list:
    if isinstance(inputs, str):
        raise InvalidRequestError("input must be a list of texts (or of token-id lists), not one string",
                                  param="input")
    items = list(inputs)
    if not items:
        raise InvalidRequestError("input is empty: send at least one text", param="input")
    kinds = {isinstance(x, str) for x in items}
    if len(kinds) > 1:
        raise InvalidRequestError("input mixes texts and token-id lists: send one kind", param="input")
    for i, x in enumerate(items):
        if isinstance(x, str) and not x:
            raise InvalidRequestError(f"input[{i}] is an empty string", param="input")
    return items
