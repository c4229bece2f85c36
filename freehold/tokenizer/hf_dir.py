"""Load a tokenizer from a Hugging Face model directory: tokenizer.json (vocabulary, and through its post-processor
whether BOS/EOS are added), tokenizer_config.json (special tokens), generation_config.json (EOS ids) and the chat
template (chat_template.jinja, chat_template.json or tokenizer_config.json)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from freehold.errors import ModelLoadError
from freehold.tokenizer.special import SpecialTokens, TokenizerParts, special_vocab, stop_token_ids


def load_hf_dir(path: str | Path) -> TokenizerParts:
    directory = Path(path)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelLoadError(f"{directory} has no tokenizer.json (Freehold needs a fast-tokenizer file)")
    try:
        backend = HFTokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the tokenizers library raises a plain Exception on malformed files
        raise ModelLoadError(f"cannot parse {tokenizer_file}: {e}") from e
    config = _read_json(directory / "tokenizer_config.json")
    generation = _read_json(directory / "generation_config.json")
    special = _special_tokens(backend, config, generation, directory)
    return TokenizerParts(backend, special, _chat_template(directory, config))


def _special_tokens(backend: HFTokenizer, config: dict[str, Any], generation: dict[str, Any],
                    directory: Path) -> SpecialTokens:
    bos_id = _token_id(backend, config.get("bos_token"), "bos_token", directory)
    eos_id = _token_id(backend, config.get("eos_token"), "eos_token", directory)
    eos_ids = _as_list(eos_id) + _as_list(generation.get("eos_token_id"))  # generation_config: an id or a list
    # As transformers 5: tokenizer.json's post-processor decides; add_bos_token in tokenizer_config is ignored.
    probe = backend.encode("a", add_special_tokens=True).ids
    return SpecialTokens(
        bos_token_id=bos_id, eos_token_id=eos_id,
        eos_token_ids=stop_token_ids(eos_ids, special_vocab(backend)),
        unk_token_id=_token_id(backend, config.get("unk_token"), "unk_token", directory),
        pad_token_id=_token_id(backend, config.get("pad_token"), "pad_token", directory),
        add_bos_token=bos_id is not None and probe[:1] == [bos_id],
        add_eos_token=eos_id is not None and len(probe) > 1 and probe[-1] == eos_id)


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _token_id(backend: HFTokenizer, entry: Any, name: str, directory: Path) -> int | None:
    """tokenizer_config writes a special token as a string, as {"content": ...}, or null."""
    text = entry.get("content") if isinstance(entry, dict) else entry
    if text is None:
        return None
    token_id = backend.token_to_id(text)
    if token_id is None:
        raise ModelLoadError(f"{directory}/tokenizer_config.json names {name} {text!r}, which is not in tokenizer.json")
    return token_id


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"{directory}: chat_template must be a string, got {type(template).__name__}")
    return template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
