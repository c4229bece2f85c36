"""The embedder against sentence-transformers (the reference) on the same folders: the bundled all-MiniLM-L6-v2,
and small random BERTs of other shapes with cls and max pooling. Parity: cosine >= 0.99999, max |delta| < 1e-4."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from freehold.embed import Embedder
from freehold.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError

SHORT = ["hello world", "What is the capital of France?", "a"]
NON_ASCII = ["Ça va très bien, merci ! Größe, Straße, naïve café", "日本語のテキストを埋め込む。", "Привет, мир 🌍 ∑ x²"]
LONG = [" ".join(["The quick brown fox jumps over the lazy dog near the riverbank at dawn."] * 40),
        "Unicode über alles: " + "café crème brûlée " * 120]
ALL = SHORT + NON_ASCII + LONG


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def reference(embedder):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(embedder.folder.path), device="cpu")


def assert_parity(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cosine.min() >= 0.99999, cosine
    assert np.abs(ours - theirs).max() < 1e-4


def test_the_default_folder_is_read(embedder):
    assert (embedder.name, embedder.dim, embedder.max_seq_length, embedder.normalize) == \
        ("all-MiniLM-L6-v2", 384, 256, True)


@pytest.mark.parametrize("text", ALL)
def test_each_input_alone_matches_sentence_transformers(embedder, reference, text):
    assert_parity(embedder.embed([text]).vectors, reference.encode([text], convert_to_numpy=True))


def test_a_mixed_batch_matches_and_keeps_input_order(embedder, reference):
    result = embedder.embed(ALL)
    assert_parity(result.vectors, reference.encode(ALL, convert_to_numpy=True))
    alone = np.concatenate([embedder.embed([t]).vectors for t in ALL])
    assert np.abs(result.vectors - alone).max() < 1e-6  # a row does not depend on its batch
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-6)


def test_long_inputs_are_truncated_and_flagged(embedder, reference):
    result = embedder.embed(ALL)
    assert result.truncated == [False] * 6 + [True, True]
    full = embedder.count_tokens(ALL)
    assert result.num_tokens == [min(n, 256) for n in full] and full[-1] > 256 and full[-2] > 256


def test_count_tokens_equals_the_reference_tokenizer(embedder, reference):
    assert embedder.count_tokens(ALL) == [len(reference.tokenizer(t)["input_ids"]) for t in ALL]


def test_token_ids_embed_as_their_text(embedder):
    ids = [embedder.encode_tokens(t) for t in ALL]
    assert embedder.decode_tokens(ids[0]) == "hello world"
    assert np.abs(embedder.embed(ids).vectors - embedder.embed(ALL).vectors).max() < 1e-6
    assert embedder.embed(ids).truncated == embedder.embed(ALL).truncated


@pytest.mark.parametrize("inputs, needle", [([], "empty"), (["ok", ""], "input[1] is an empty string"),
                                            ([[101, 10 ** 9]], "not a token id"), ([[]], "empty list"),
                                            (["text", [1, 2]], "mixes")])
def test_bad_input_names_the_field(embedder, inputs, needle):
    with pytest.raises(InvalidRequestError, match=needle.replace("[", r"\[").replace("]", r"\]")) as exc:
        embedder.embed(inputs)
    assert exc.value.param == "input"


# ---- other BERT shapes and pooling modes ---------------------------------------------------------------------------
def _tiny_folder(tmp_path, source, pooling: str, normalize: bool):
    """A random BERT (64 wide, 2 layers, 4 heads) saved as a sentence-transformers folder with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, tmp_path / name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
    return tmp_path


@pytest.mark.parametrize("pooling, normalize", [("cls", False), ("max", True), ("mean", False)])
def test_other_bert_shapes_and_pooling_modes_match(tmp_path, embedder, pooling, normalize):
    from sentence_transformers import SentenceTransformer
    folder = _tiny_folder(tmp_path, embedder.folder.path, pooling, normalize)
    ours = Embedder(folder)
    assert (ours.dim, ours.max_seq_length, ours.normalize) == (64, 32, normalize)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(ALL, convert_to_numpy=True)
    result = ours.embed(ALL)
    assert_parity(result.vectors, theirs)
    assert result.truncated == [n > 32 for n in ours.count_tokens(ALL)] and any(result.truncated)


def test_other_architectures_are_refused(tmp_path, embedder):
    for name in ("model.safetensors", "tokenizer.json"):
        shutil.copy(embedder.folder.path / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UnsupportedModelError, match="model_type 'llama'"):
        Embedder(tmp_path)
    with pytest.raises(ModelLoadError, match="not a directory"):
        Embedder(tmp_path / "missing")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        Embedder(tmp_path)
