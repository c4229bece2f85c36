"""Tokenization for Freehold: `Tokenizer` (text <-> ids, chat templates) and `IncrementalDetokenizer` (streaming)."""
from freehold.tokenizer.chat_template import TemplateOptions
from freehold.tokenizer.detokenizer import IncrementalDetokenizer
from freehold.tokenizer.special import SpecialTokens
from freehold.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "SpecialTokens", "TemplateOptions", "Tokenizer"]
