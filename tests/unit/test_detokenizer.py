"""IncrementalDetokenizer: streamed text equals a one-shot decode for any split, and never ends mid-character."""
import random

import pytest

from freehold.models.locate import default_model_path
from freehold.tokenizer import IncrementalDetokenizer, SpecialTokens, Tokenizer
from freehold.tokenizer.gguf_builder import build_backend
from freehold.tokenizer.gguf_vocab import GGUFVocab, TokenType

TEXTS = [
    "Hello world, this is a plain sentence.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and 🤖!",
    "中文文本，日本語のテキスト、한국어 텍스트。",
    "Combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0350\u036b and ẞ ǅ ﬁ",
    "RTL: שלום עולם مرحبا بالعالم \u200f mixed \u202eevil\u202c",
    "Odd whitespace:\t\ttabs\r\nCRLF\u00a0nbsp\u3000ideo\u2028ls  double  \n\n\n trailing   ",
    "  leading spaces and code: def f(x):\n    return x ** 2  # ok\n",
]
EOT_TEXT = "<|im_start|>assistant\nHi 👋<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


def _sentencepiece_tokenizer() -> Tokenizer:
    """A tiny sentencepiece-style tokenizer (`▁` spaces, `<0xXX>` byte fallback) for the Metaspace path."""
    pieces = ["▁", "H", "e", "l", "o", "w", "r", "d", "日", "本", "He", "ll", "llo", "Hello", "▁Hello", "or", "▁w",
              "▁wor", "ld", "▁world"]
    tokens = ("<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces)
    types = (TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, *[TokenType.BYTE] * 256,
             *[TokenType.NORMAL] * len(pieces))
    vocab = GGUFVocab(architecture="llama", model="llama", pre="default", tokens=tokens, token_types=types,
                      scores=tuple(-float(i) for i in range(len(tokens))), merges=None, bos_token_id=1,
                      eos_token_id=2, unk_token_id=0, pad_token_id=None, add_bos_token=False, add_eos_token=False,
                      chat_template=None)
    special = SpecialTokens(bos_token_id=1, eos_token_id=2, eos_token_ids=(2,), unk_token_id=0, pad_token_id=None,
                            add_bos_token=False, add_eos_token=False)
    return Tokenizer(build_backend(vocab), special, None)


def _stream(tokenizer: Tokenizer, ids: list[int], cuts: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    bounds = [0, *cuts, len(ids)]
    chunks = [detok.push(ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    return [*chunks, detok.flush()]


def _random_cuts(rng: random.Random, num_ids: int) -> list[int]:
    return sorted(rng.sample(range(1, num_ids), k=rng.randint(0, min(num_ids - 1, 12)))) if num_ids > 1 else []


@pytest.mark.parametrize("text", TEXTS)
def test_random_splits_match_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    rng = random.Random(text)
    for _ in range(25):
        chunks = _stream(tokenizer, ids, _random_cuts(rng, len(ids)))
        assert "".join(chunks) == tokenizer.decode(ids) == text
        assert all("\ufffd" not in chunk for chunk in chunks), chunks


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time(tokenizer, text):
    ids = tokenizer.encode(text)
    chunks = _stream(tokenizer, ids, list(range(1, len(ids))))
    assert "".join(chunks) == text
    assert chunks[-1] == ""  # nothing was held back at the end of valid text


def test_emoji_split_over_byte_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1, "the test needs an emoji that the vocabulary spells with several byte tokens"
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1:]) == "😀"


def test_leading_space_of_byte_level_tokens_is_kept(tokenizer):
    ids = tokenizer.encode("Hello world again")
    chunks = _stream(tokenizer, ids, list(range(1, len(ids))))
    assert chunks[:3] == ["Hello", " world", " again"]


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode(EOT_TEXT)
    rng = random.Random(7)
    for _ in range(10):
        cuts = _random_cuts(rng, len(ids))
        assert "".join(_stream(tokenizer, ids, cuts, skip_special_tokens=True)) == "assistant\nHi 👋"
        assert "".join(_stream(tokenizer, ids, cuts)) == EOT_TEXT


def test_flush_emits_an_incomplete_trailing_character(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]  # drop the emoji's last byte token
    detok = IncrementalDetokenizer(tokenizer)
    streamed = detok.push(ids)
    assert "\ufffd" not in streamed
    rest = detok.flush()
    assert rest.endswith("\ufffd")
    assert streamed + rest == tokenizer.decode(ids)


def test_invalid_bytes_followed_by_text_match_full_decode(tokenizer):
    emoji_ids = tokenizer.encode("😀")
    ids = emoji_ids[:1] + tokenizer.encode(" then text") + emoji_ids[1:2] + tokenizer.encode("!")
    rng = random.Random(3)
    for _ in range(20):
        assert "".join(_stream(tokenizer, ids, _random_cuts(rng, len(ids)))) == tokenizer.decode(ids)


@pytest.mark.parametrize("text", ["Hello world", " Hello world 日本語 😀 e\u0301", "Hello  world\nHello"])
def test_sentencepiece_random_splits(text):
    tokenizer = _sentencepiece_tokenizer()
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text.removeprefix(" ")  # Metaspace folds a leading space into the first `▁`
    rng = random.Random(text)
    for _ in range(25):
        chunks = _stream(tokenizer, ids, _random_cuts(rng, len(ids)))
        assert "".join(chunks) == tokenizer.decode(ids)
        assert all("\ufffd" not in chunk for chunk in chunks), chunks


def test_sentencepiece_word_boundaries():
    tokenizer = _sentencepiece_tokenizer()
    ids = tokenizer.encode("Hello world")
    assert [tokenizer.id_to_token(i) for i in ids] == ["▁Hello", "▁world"]
    assert _stream(tokenizer, ids, [1]) == ["Hello", " world", ""]


def test_token_ids_are_recorded(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    detok.push([1, 2])
    detok.push([])
    detok.push([3])
    assert detok.token_ids == [1, 2, 3]
