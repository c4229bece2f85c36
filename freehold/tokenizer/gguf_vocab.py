"""The tokenizer a GGUF file describes, read from its `tokenizer.ggml.*` and `tokenizer.chat_template` metadata."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freehold.errors import ModelLoadError
from freehold.tokenizer.gguf_metadata import read_gguf_metadata


class TokenType(enum.IntEnum):
    """llama.cpp's `tokenizer.ggml.token_type` values."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class GGUFVocab:
    """Everything needed to rebuild the tokenizer; field names follow the GGUF keys."""

    architecture: str | None  # general.architecture: some tokenizers depend on it (phi3, gemma)
    model: str  # tokenizer.ggml.model: 'gpt2' (byte-level BPE), 'llama' (sentencepiece) ...
    pre: str | None  # tokenizer.ggml.pre: which split regex the merges were learned with
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # empty when the file has none
    scores: tuple[float, ...]  # empty when the file has none
    merges: tuple[str, ...] | None  # None: the file has no merges (derive them from the scores)
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


def read_gguf_vocab(path: str | Path) -> GGUFVocab:
    """Read the tokenizer metadata of a GGUF file; raises ModelLoadError if it is unreadable or incomplete."""
    fields = _read_fields(Path(path))
    tokens = _required(fields, "tokenizer.ggml.tokens", path)
    model = _required(fields, "tokenizer.ggml.model", path)
    vocab = GGUFVocab(
        architecture=fields.get("general.architecture"),
        model=model,
        pre=fields.get("tokenizer.ggml.pre"),
        tokens=tuple(tokens),
        token_types=tuple(fields.get("tokenizer.ggml.token_type", ())),
        scores=tuple(fields.get("tokenizer.ggml.scores", ())),
        merges=_optional_tuple(fields.get("tokenizer.ggml.merges")),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        unk_token_id=fields.get("tokenizer.ggml.unknown_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise (transformers agrees).
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
    )
    _check_ids(vocab, path)
    return vocab


def _read_fields(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file does not exist: {path}")
    return read_gguf_metadata(path)


def _required(fields: dict[str, Any], key: str, path: str | Path) -> Any:
    if key not in fields:
        raise ModelLoadError(f"{path} has no `{key}` metadata, so its tokenizer cannot be built")
    return fields[key]


def _optional_tuple(values: list[str] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(values)


def _check_ids(vocab: GGUFVocab, path: str | Path) -> None:
    num_tokens = len(vocab.tokens)
    if vocab.token_types and len(vocab.token_types) != num_tokens:
        raise ModelLoadError(
            f"{path}: tokenizer.ggml.token_type has {len(vocab.token_types)} entries for {num_tokens} tokens")
    if vocab.scores and len(vocab.scores) != num_tokens:
        raise ModelLoadError(f"{path}: tokenizer.ggml.scores has {len(vocab.scores)} entries for {num_tokens} tokens")
    named = {"bos": vocab.bos_token_id, "eos": vocab.eos_token_id, "unknown": vocab.unk_token_id,
             "padding": vocab.pad_token_id}
    for name, token_id in named.items():
        if token_id is not None and not 0 <= token_id < num_tokens:
            raise ModelLoadError(
                f"{path}: tokenizer.ggml.{name}_token_id = {token_id} is outside the vocabulary of {num_tokens} tokens")
