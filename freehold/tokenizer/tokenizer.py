"""`Tokenizer`: text <-> token ids and chat prompts for one model, built from a GGUF file or a Hugging Face dir."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from freehold.tokenizer.chat_template import CHATML_TEMPLATE, ChatTemplate, TemplateOptions
from freehold.tokenizer.gguf_builder import load_gguf
from freehold.tokenizer.hf_dir import load_hf_dir
from freehold.tokenizer.special import SpecialTokens


class Tokenizer:
    """Wraps a Hugging Face `tokenizers.Tokenizer` with the model's special tokens and chat template.
    Ids match transformers' `AutoTokenizer` for the same files."""

    def __init__(self, backend: HFTokenizer, special: SpecialTokens, chat_template: str | None):
        self._backend = backend
        self.special = special
        self.has_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else CHATML_TEMPLATE

    def use_chat_template(self, source: str) -> None:
        """Render chats with `source` instead of the model's own template (`--chat-template`, as in vLLM and
        llama.cpp). ModelLoadError if it does not compile; then nothing changes."""
        compiled = ChatTemplate(source, self._template_tokens())
        self.chat_template, self.has_chat_template = source, True
        self.__dict__["_compiled_template"] = compiled  # replaces the cached_property's value

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        return cls(*load_gguf(path))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        return cls(*load_hf_dir(path))

    @classmethod
    def from_model_path(cls, path: str | Path) -> Tokenizer:
        """A GGUF file or a Hugging Face model directory (see `freehold.models.locate.resolve_model_path`)."""
        return cls.from_hf_dir(path) if Path(path).is_dir() else cls.from_gguf(path)

    # ---- ids ---------------------------------------------------------------------------------------------------
    @property
    def backend(self) -> HFTokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.special.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.special.eos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS and the end-of-turn tokens (e.g. `<|im_end|>`)."""
        return self.special.eos_token_ids

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---- text ----------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) become their ids;
        `add_special_tokens` adds BOS/EOS only where the model asks for them."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, options: TemplateOptions | None = None) -> str:
        """The prompt text for `messages` (OpenAI-style dicts; content a string or a list of text parts).
        Encode it with `add_special_tokens=False`, as transformers does, since templates write their own BOS.
        Raises InvalidRequestError if the template rejects the messages, ModelLoadError if it does not compile."""
        return self._compiled_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                              options=options)

    @cached_property
    def _compiled_template(self) -> ChatTemplate:
        return ChatTemplate(self.chat_template, self._template_tokens())

    def _template_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as template variables; a token the model lacks stays undefined."""
        names = {"bos_token": self.special.bos_token_id, "eos_token": self.special.eos_token_id,
                 "unk_token": self.special.unk_token_id, "pad_token": self.special.pad_token_id}
        return {name: self._backend.id_to_token(i) for name, i in names.items() if i is not None}
