"""Rebuild a Hugging Face `tokenizers.Tokenizer` from a GGUF vocabulary, the way transformers' GGUF converter
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`) does, so both give the same ids."""
from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from freehold.errors import UnsupportedModelError
from freehold.tokenizer.gguf_vocab import GGUFVocab, TokenType, read_gguf_vocab
from freehold.tokenizer.special import (SpecialTokens, TokenizerParts, set_bos_eos_processor, special_vocab,
                                        stop_token_ids)

logger = logging.getLogger(__name__)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> split regex. Any other value (e.g. 'default', 'gpt2', 'smollm') keeps GPT-2's
# built-in ByteLevel regex, as transformers does. Note: llama.cpp also splits digits one by one for 'smollm'
# and 'starcoder'; transformers does not, and we match transformers.
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# `tokenizer.ggml.pre` values known to use GPT-2's regex (in transformers); others get a warning.
GPT2_SPLIT_PRES = ("default", "gpt2", "gpt-2", "smollm", "starcoder", "refact", "olmo", "mpt", "codeshell",
                   "phi-2", "jais", "exaone", "minerva-7b")

_UNSUPPORTED_SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3")


def load_gguf(path: str | Path) -> TokenizerParts:
    """The tokenizer, special tokens and chat template stored in a GGUF file."""
    vocab = read_gguf_vocab(path)
    backend = build_backend(vocab)
    eos_ids = [vocab.eos_token_id] if vocab.eos_token_id is not None else []
    special = SpecialTokens(
        bos_token_id=vocab.bos_token_id, eos_token_id=vocab.eos_token_id,
        eos_token_ids=stop_token_ids(eos_ids, special_vocab(backend)),
        unk_token_id=vocab.unk_token_id, pad_token_id=vocab.pad_token_id,
        add_bos_token=vocab.add_bos_token and vocab.bos_token_id is not None,
        add_eos_token=vocab.add_eos_token and vocab.eos_token_id is not None)
    set_bos_eos_processor(backend, special)
    return TokenizerParts(backend, special, vocab.chat_template)


def build_backend(vocab: GGUFVocab) -> HFTokenizer:
    """A `tokenizers.Tokenizer` with the file's vocabulary, merges, pre-tokenizer, decoder and added tokens
    (BOS/EOS adding is set by `load_gguf`)."""
    backend = _select_builder(vocab)(vocab)
    _add_special_tokens(backend, vocab)
    return backend


def _select_builder(vocab: GGUFVocab) -> Callable[[GGUFVocab], HFTokenizer]:
    if vocab.model == "gpt2":
        return _byte_level_bpe
    if vocab.model == "llama" and vocab.architecture in _UNSUPPORTED_SENTENCEPIECE_ARCHS:
        raise UnsupportedModelError(
            f"sentencepiece tokenizer of architecture {vocab.architecture!r} is not supported (Gemma vocabularies "
            "need respelled tokens); supported GGUF tokenizers: 'gpt2' (byte-level BPE) and 'llama' (sentencepiece)")
    if vocab.model == "llama":
        return _sentencepiece_bpe
    raise UnsupportedModelError(
        f"GGUF tokenizer model {vocab.model!r} is not supported; supported: 'gpt2' (byte-level BPE) and "
        "'llama' (sentencepiece BPE)")


def _byte_level_bpe(vocab: GGUFVocab) -> HFTokenizer:
    """GPT-2 style: tokens are spelled in the byte alphabet; the split regex depends on `tokenizer.ggml.pre`."""
    if vocab.merges is None:
        raise UnsupportedModelError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = frozenset(spelling.values())
    token_to_id = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(vocab.tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in vocab.merges]
    backend = HFTokenizer(BPE(vocab=token_to_id, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(vocab.pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = PRE_TOKENIZER_SPLITS.get(pre) if pre is not None else None
    if split is None:
        if pre is not None and pre not in GPT2_SPLIT_PRES:
            logger.warning("GGUF pre-tokenizer %r is not known; splitting text like GPT-2, as transformers does "
                           "(ids may differ from llama.cpp's)", pre)
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _sentencepiece_bpe(vocab: GGUFVocab) -> HFTokenizer:
    """Llama/Mistral style: `▁` for spaces, byte fallback via `<0xXX>` tokens, merges from the file or derived
    from the token scores."""
    token_to_id = {token: index for index, token in enumerate(vocab.tokens)}
    backend = HFTokenizer(BPE(vocab=token_to_id, merges=_sentencepiece_merges(vocab, token_to_id), fuse_unk=True,
                              byte_fallback=True, dropout=None))
    if vocab.architecture == "phi3":  # the prefix space comes from a normalizer, not from Metaspace
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(prepend="\u2581"), normalizers.Replace(pattern=" ", content="\u2581")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)
    ])
    return backend


def _sentencepiece_merges(vocab: GGUFVocab, token_to_id: dict[str, int]) -> list[tuple[str, str]]:
    if vocab.merges is not None:
        return [tuple(merge.split(" ")) for merge in vocab.merges]
    if not vocab.scores:
        raise UnsupportedModelError("GGUF sentencepiece tokenizer has neither tokenizer.ggml.merges nor scores")
    return merges_from_scores(token_to_id, dict(zip(vocab.tokens, vocab.scores)))


def merges_from_scores(token_to_id: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two known tokens is a merge, ranked by the merged token's score, best first
    (transformers' `generate_merges`)."""
    ranked = []
    for merged, score in scores.items():
        pairs = [(merged[:i], merged[i:], score) for i in range(1, len(merged))
                 if merged[:i] in token_to_id and merged[i:] in token_to_id]
        ranked.extend(sorted(pairs, key=lambda p: (token_to_id[p[0]], token_to_id[p[1]])))
    ranked.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_special_tokens(backend: HFTokenizer, vocab: GGUFVocab) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so both are matched
    whole in text. A byte-level 'control' token spelled outside the byte alphabet is a llama.cpp mislabel: skip."""
    types = vocab.token_types or (TokenType.NORMAL,) * len(vocab.tokens)
    alphabet = frozenset(bytes_to_unicode().values()) if vocab.model == "gpt2" else None
    control = [AddedToken(token, normalized=False, special=True) for token, kind in zip(vocab.tokens, types)
               if kind == TokenType.CONTROL and (alphabet is None or set(token) <= alphabet)]
    backend.add_special_tokens(control)
    known = backend.get_vocab(with_added_tokens=True)
    user_defined = [AddedToken(token, normalized=False, special=False) for token, kind in zip(vocab.tokens, types)
                    if kind == TokenType.USER_DEFINED and token in known]
    backend.add_tokens(user_defined)
    named = (vocab.bos_token_id, vocab.eos_token_id, vocab.unk_token_id, vocab.pad_token_id)
    added = backend.get_added_tokens_decoder()
    named_tokens = {vocab.tokens[i] for i in named if i is not None} - {str(t) for t in added.values()}
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in sorted(named_tokens)])


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))
