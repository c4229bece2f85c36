"""ConstraintSpec -> Constraint: xgrammar grammars compiled for one tokenizer, cached by spec (LRU).

Compiling a large schema can take tens of milliseconds, so callers compile off the engine thread (the server in
`asyncio.to_thread`) and hand the engine a finished `Constraint`. `compile` is thread-safe.

The grammar engine is told the model's stop ids, so a matcher allows them exactly when the grammar accepts the
output so far: a constrained sequence can only end on a complete string. Special tokens (chat markers and the
like) are never allowed inside the constrained text. JSON is generated compact (`{"a": 1, "b": [2, 3]}`, no
free whitespace): a small model given free whitespace can pad forever instead of closing the object.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import xgrammar as xgr

from freehold.constrain.schema_support import check_schema_support
from freehold.constrain.spec import Choice, Constraint, ConstraintSpec, Grammar, JsonObject, JsonSchema, Regex
from freehold.errors import InvalidRequestError
from freehold.tokenizer import Tokenizer

DEFAULT_CACHE_SIZE = 256


class ConstraintCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE,
                 max_threads: int = 2):
        """vocab_size: the model's (the width of its logits), which may exceed the tokenizer's."""
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.tokenizer_info = tokenizer_info(tokenizer, vocab_size)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[ConstraintSpec, Constraint] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses

    def compile(self, spec: ConstraintSpec) -> Constraint:
        """The compiled constraint for `spec`; InvalidRequestError names what the grammar engine cannot handle."""
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        constraint = Constraint(spec, self._compile(spec), self.vocab_size)
        with self._lock:
            self.num_compiled += 1
            self._cache[spec] = constraint
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return constraint

    def cached(self, spec: ConstraintSpec) -> bool:
        with self._lock:
            return spec in self._cache

    def _compile(self, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        try:
            if isinstance(spec, JsonObject):
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                          strict_mode=False)
            if isinstance(spec, JsonSchema):
                check_schema_support(spec.schema)
                return self._compile_schema(spec.text)
            if isinstance(spec, Regex):
                return self._compiler.compile_regex(spec.pattern)
            if isinstance(spec, Grammar):
                return self._compiler.compile_grammar(spec.ebnf)
            if isinstance(spec, Choice):
                return self._compiler.compile_grammar(choice_ebnf(spec.options))
        except (RuntimeError, ValueError) as exc:  # xgrammar's parse and conversion errors
            raise InvalidRequestError(f"cannot constrain the output to {spec.describe()}: "
                                      f"{_engine_message(exc)}") from None
        raise TypeError(f"not a constraint spec: {spec!r}")

    def _compile_schema(self, text: str) -> xgr.CompiledGrammar:
        """Strict first: no properties or items beyond those the schema lists (what a model should write). A
        schema that needs more (minProperties or minItems above what it lists) compiles without that limit."""
        try:
            return self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        except RuntimeError:
            return self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=False)


def choice_ebnf(options: tuple[str, ...]) -> str:
    """root ::= "a" | "b" | ...  (a JSON string literal is a valid EBNF string literal, escapes included)."""
    return "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: token strings, their encoding (byte-level, byte-fallback, raw), the
    stop ids. Special tokens other than the stop ids become empty strings, which xgrammar never allows."""
    from transformers import PreTrainedTokenizerFast  # xgrammar depends on transformers to read a vocabulary

    stop_ids = [i for i in tokenizer.eos_token_ids if i < vocab_size]
    if not stop_ids:
        raise InvalidRequestError("the model has no end-of-sequence token, so no output could end a grammar")
    detected = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend),
                                                  vocab_size=vocab_size, stop_token_ids=stop_ids)
    vocab = [""] * vocab_size
    for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and (i not in tokenizer.special_token_ids or i in stop_ids):
            vocab[i] = token
    return xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size, stop_token_ids=stop_ids,
                             add_prefix_space=detected.add_prefix_space)


def _engine_message(exc: Exception) -> str:
    """xgrammar's C++ errors start with '[time] /path/file.cc:123: '; keep what follows."""
    text = str(exc).strip()
    head, sep, tail = text.partition(".cc:")
    if sep and head.startswith("["):
        text = tail.partition(": ")[2] or text
    return text
