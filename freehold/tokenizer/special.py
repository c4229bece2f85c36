"""Which special tokens a model uses: BOS, the ids that end generation, and whether encode adds BOS/EOS."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

# Tokens that end an assistant turn or a document in common chat formats (the ones llama.cpp treats as
# end-of-generation): ChatML, Llama 3, Phi-3, Gemma, GPT-2/StarCoder/Qwen documents, DeepSeek, CodeLlama.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "<|end\u2581of\u2581sentence|>",
)


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_id: int | None  # the tokenizer's own EOS (the template's `eos_token`)
    eos_token_ids: tuple[int, ...]  # generation stops at any of these
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool  # encode(..., add_special_tokens=True) prepends BOS
    add_eos_token: bool  # encode(..., add_special_tokens=True) appends EOS


def stop_token_ids(eos_ids: Iterable[int], special_vocab: Mapping[str, int]) -> tuple[int, ...]:
    """The model's EOS ids, then every known end-of-turn token present among its special tokens
    (so a ChatML model stops at `<|im_end|>` even if its EOS is `<|endoftext|>`), without duplicates."""
    found = [special_vocab[token] for token in END_OF_TURN_TOKENS if token in special_vocab]
    return tuple(dict.fromkeys([*eos_ids, *found]))


class TokenizerParts(NamedTuple):
    """What a loader hands to `Tokenizer`."""

    backend: HFTokenizer
    special: SpecialTokens
    chat_template: str | None


def special_vocab(backend: HFTokenizer) -> dict[str, int]:
    """Added tokens marked special, by text."""
    return {token.content: i for i, token in backend.get_added_tokens_decoder().items() if token.special}


def set_bos_eos_processor(backend: HFTokenizer, special: SpecialTokens) -> None:
    """Make `encode(..., add_special_tokens=True)` add BOS/EOS as the model asks (transformers'
    `update_post_processor`)."""
    bos = backend.id_to_token(special.bos_token_id) if special.bos_token_id is not None else None
    eos = backend.id_to_token(special.eos_token_id) if special.eos_token_id is not None else None
    add_bos, add_eos = special.add_bos_token and bos is not None, special.add_eos_token and eos is not None
    single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    pieces = ([(bos, special.bos_token_id)] if add_bos else []) + ([(eos, special.eos_token_id)] if add_eos else [])
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pieces)
