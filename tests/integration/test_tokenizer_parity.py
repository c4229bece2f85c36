"""Freehold's tokenizer against transformers' `AutoTokenizer` on the same files: ids, decoding, chat templates.

Besides the default SmolLM2 GGUF, small GGUFs are written here with other `tokenizer.ggml.pre` values and a
sentencepiece ('llama') vocabulary, so those converter paths are checked too.
"""
import inspect
import io
import json
import textwrap
from pathlib import Path

import gguf
import pytest
from pydoc_data.topics import topics
from transformers import AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from freehold.errors import ModelLoadError, UnsupportedModelError
from freehold.models.locate import default_model_path
from freehold.tokenizer import Tokenizer
from freehold.tokenizer.gguf_builder import PRE_TOKENIZER_SPLITS
from freehold.tokenizer.gguf_metadata import read_gguf_metadata

PYDOC_TEXT = "\n".join(topics[k] for k in sorted(topics))
CODE_TEXT = inspect.getsource(textwrap) + textwrap.dedent('''
    async def main(xs: list[int]) -> dict[str, int]:
        """Doc."""\r\n\tresult = {f"k{i:03d}": x ** 2 for i, x in enumerate(xs) if x % 2 == 0}
        return result  # 'quoted' "double" `tick` \\\\ 0x1F 1_000_000 3.14e-10 != <= >>= ...
    ''')
UNICODE_TEXT = (
    "Emoji 😀👍🏽👨‍👩‍👧‍👦🇫🇷 | 中文文本，日本語のテキスト、한국어 | e\u0301 a\u0308 Z\u0351\u0350 ẞ ǅ ﬁ | "
    "שלום עולם مرحبا \u200f\u202eevil\u202c | \t\ttabs\r\nCRLF\u00a0nbsp\u3000ideo\u2028ls\u2029ps \u200b zw  \n\n\n"
    "   trailing spaces   \x00\x07 ctrl | don't I'LL we've 1234567 1,5 ½ ² Ⅻ"
)
SPECIAL_TEXT = "<|im_start|>user\nhi <|im_end|>\n<|endoftext|>x<|im_start|>"
TEXTS = {"pydoc": PYDOC_TEXT, "code": CODE_TEXT, "unicode": UNICODE_TEXT, "special": SPECIAL_TEXT, "empty": ""}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello 😀"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Ça va ?\nMulti-line."}],
]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_tokenizer(model_path):
    return AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.fixture(scope="module")
def tokenizer(model_path) -> Tokenizer:
    return Tokenizer.from_gguf(model_path)


@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_transformers(tokenizer, hf_tokenizer, name, add_special_tokens):
    text = TEXTS[name]
    expected = hf_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("name", TEXTS)
def test_decode_round_trips_and_matches_transformers(tokenizer, hf_tokenizer, name):
    ids = tokenizer.encode(TEXTS[name])
    assert tokenizer.decode(ids) == TEXTS[name] == hf_tokenizer.decode(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_match_transformers(tokenizer, hf_tokenizer):
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id
    assert tokenizer.vocab_size == len(hf_tokenizer)
    assert tokenizer.special_token_ids == frozenset(hf_tokenizer.all_special_ids) | {
        i for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special}
    assert [tokenizer.id_to_token(i) for i in range(0, tokenizer.vocab_size, 997)] == \
        hf_tokenizer.convert_ids_to_tokens(list(range(0, tokenizer.vocab_size, 997)))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, messages):
    for add_generation_prompt in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    prompt = tokenizer.apply_chat_template(messages)
    assert tokenizer.encode(prompt, add_special_tokens=False) == hf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False)


# ---- a Hugging Face directory ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(hf_tokenizer, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf_dir")
    hf_tokenizer.save_pretrained(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False  # transformers 5 ignores this: tokenizer.json's post-processor decides
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    spec = json.loads((directory / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    spec["post_processor"] = {  # prepend BOS, which the GGUF leaves off
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5]}))
    return directory


def test_hf_dir_matches_transformers(hf_dir):
    ours, theirs = Tokenizer.from_hf_dir(hf_dir), AutoTokenizer.from_pretrained(str(hf_dir))
    for text in (UNICODE_TEXT, SPECIAL_TEXT, CODE_TEXT):
        for add_special_tokens in (True, False):
            expected = theirs(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected
    assert ours.encode("hi")[0] == ours.bos_token_id == 1 and ours.special.add_bos_token
    assert ours.eos_token_ids == (2, 0, 5)
    assert ours.has_chat_template
    assert ours.apply_chat_template(CONVERSATIONS[0]) == theirs.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)


# ---- other GGUF tokenizer variants, written here ----------------------------------------------------------------
VARIANT_TEXT = UNICODE_TEXT + "\n" + CODE_TEXT[:3000] + PYDOC_TEXT[:20000]


def _write_gguf(path: Path, metadata: dict) -> None:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if key == "tokenizer.ggml.token_type":
            writer.add_token_types(value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _sentencepiece_metadata(base: dict) -> dict:
    """A small sentencepiece BPE vocabulary, stored the way llama.cpp's converter stores one (no merges)."""
    spm = pytest.importorskip("sentencepiece")
    corpus = [line for key in sorted(topics)[:40] for line in topics[key].splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=600,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=["<think>"],
                                   control_symbols=["<|im_end|>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ids = range(sp.get_piece_size())
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if sp.id_to_piece(i) == "<think>" else 1 for i in ids]
    metadata = {k: v for k, v in base.items() if not k.startswith("tokenizer.")}
    metadata.update({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "llama.vocab_size": len(types),
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids], "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in ids], "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id()})
    return metadata


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf_variants")


def _variant_gguf(variant: str, directory: Path, model_path: Path) -> Path:
    path = directory / f"{variant}.gguf"
    base = read_gguf_metadata(model_path)
    metadata = _sentencepiece_metadata(base) if variant == "sentencepiece" else {**base, "tokenizer.ggml.pre": variant}
    _write_gguf(path, metadata)
    return path


def test_split_regexes_match_transformers():
    assert PRE_TOKENIZER_SPLITS.items() <= GGUF_PRE_TOKENIZER_SPLITS.items()


@pytest.mark.parametrize("variant", ["qwen2", "llama-bpe", "sentencepiece"])
def test_gguf_variant_matches_transformers(variant_dir, model_path, tokenizer, variant):
    path = _variant_gguf(variant, variant_dir, model_path)
    ours, theirs = Tokenizer.from_gguf(path), AutoTokenizer.from_pretrained(str(variant_dir), gguf_file=path.name)
    for text in (VARIANT_TEXT, SPECIAL_TEXT + " <think>x</think>", "  leading", ""):
        for add_special_tokens in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special_tokens)
            assert ids == theirs(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert ours.decode(ids) == theirs.decode(ids)
            assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    if variant != "sentencepiece":  # the split regex matters: these differ from SmolLM's GPT-2 split
        assert ours.encode(VARIANT_TEXT) != tokenizer.encode(VARIANT_TEXT)
        assert ours.decode(ours.encode(VARIANT_TEXT)) == VARIANT_TEXT
    else:
        assert ours.encode("hi")[0] == ours.bos_token_id  # sentencepiece GGUFs add BOS by default


# ---- reading GGUF metadata, and loading errors --------------------------------------------------------------------
def test_metadata_reader_matches_gguf_library(model_path):
    reference = {name: field.contents() for name, field in gguf.GGUFReader(model_path).fields.items()
                 if not name.startswith("GGUF.")}
    assert read_gguf_metadata(model_path) == reference


def test_unsupported_tokenizer_model_is_named(variant_dir, model_path):
    path = variant_dir / "bert.gguf"
    _write_gguf(path, {**read_gguf_metadata(model_path), "tokenizer.ggml.model": "bert"})
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        Tokenizer.from_gguf(path)


def test_unreadable_files_give_model_load_error(tmp_path, model_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "text.gguf")
    with model_path.open("rb") as f:
        (tmp_path / "truncated.gguf").write_bytes(f.read(100_000))
    with pytest.raises(ModelLoadError, match="malformed"):
        Tokenizer.from_gguf(tmp_path / "truncated.gguf")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
