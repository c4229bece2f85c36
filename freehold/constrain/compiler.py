"""ConstraintSpec -> Constraint: xgrammar grammars compiled for one tokenizer, cached by spec (LRU, bounded by bytes).

Compiling a large schema can take seconds, so callers compile off the engine thread (the server on its own bounded
pool, `freehold.server.workers`) and hand the engine a finished `Constraint`. `compile` is thread-safe.

The grammar engine is told the model's stop ids, so a matcher allows them exactly when the grammar accepts the
output so far: a constrained sequence can only end on a complete string. Special tokens (chat markers and the
like) are never allowed inside the constrained text. JSON is generated compact (`{"a": 1, "b": [2, 3]}`, no
free whitespace): a small model given free whitespace can pad forever instead of closing the object.

A grammar that no output can satisfy (`[^\\s\\S]`, or a required string whose pattern matches nothing) is
rejected here, before any request runs it (`_accepts_nothing`). The cache keeps each spec's verdict, compiled
grammar or error, so a repeated bad request costs no second compile.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import NamedTuple

import xgrammar as xgr

from freehold.constrain.matcher import clear_token_bits
from freehold.constrain.schema_support import check_schema_support
from freehold.constrain.spec import (Choice, Constraint, ConstraintSpec, Grammar, JsonObject, JsonSchema, Regex,
                                    StructuralTag)
from freehold.errors import InvalidRequestError
from freehold.tokenizer import Tokenizer

DEFAULT_CACHE_BYTES = 256 << 20
_MAX_FORCED_STEPS = 64  # forced stretches followed when looking for a dead end (each one a deterministic string)


class _Verdict(NamedTuple):
    """A cache entry: the compiled constraint, or the error the spec gets; `nbytes` is what keeping it costs."""

    constraint: Constraint | None
    error: str | None  # the message only: each request raises a fresh error (a shared one would grow its traceback)
    nbytes: int


class ConstraintCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_threads: int = 2):
        """vocab_size: the model's (the width of its logits), which may exceed the tokenizer's. cache_bytes bounds
        the compiled grammars kept (xgrammar's `memory_size_bytes` plus the spec's text); a grammar larger than the
        whole budget is compiled and returned but not kept."""
        self.vocab_size = vocab_size
        self.cache_bytes = cache_bytes
        self.tokenizer_info = tokenizer_info(tokenizer, vocab_size)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[ConstraintSpec, _Verdict] = OrderedDict()
        self._lock = threading.Lock()
        self.num_cached_bytes = 0
        self.num_compiled = 0  # cache misses

    def compile(self, spec: ConstraintSpec) -> Constraint:
        """The compiled constraint for `spec`; InvalidRequestError names what the grammar engine cannot handle, or
        says that no output satisfies the spec."""
        known = self.lookup(spec)
        if known is not None:
            return known
        verdict = self._verdict(spec)
        with self._lock:
            self.num_compiled += 1
            self._keep(spec, verdict)
        if verdict.error is not None:
            raise InvalidRequestError(verdict.error)
        return verdict.constraint  # type: ignore[return-value]

    def lookup(self, spec: ConstraintSpec) -> Constraint | None:
        """The cached constraint (raising the cached error for a spec known to be bad), or None if not cached."""
        with self._lock:
            verdict = self._cache.get(spec)
            if verdict is None:
                return None
            self._cache.move_to_end(spec)
        if verdict.error is not None:
            raise InvalidRequestError(verdict.error)
        return verdict.constraint

    def cached(self, spec: ConstraintSpec) -> bool:
        with self._lock:
            return spec in self._cache

    def _verdict(self, spec: ConstraintSpec) -> _Verdict:
        try:
            grammar = self._compile(spec)
            if _accepts_nothing(grammar, self.vocab_size):
                raise InvalidRequestError(f"cannot constrain the output to {spec.describe()}: no output satisfies "
                                          "it (its language is empty)")
        except InvalidRequestError as exc:
            return _Verdict(None, str(exc), _spec_bytes(spec) + len(str(exc)))
        except (RuntimeError, ValueError) as exc:  # xgrammar failing on the compiled grammar (matcher, jump-forward)
            message = f"cannot constrain the output to {spec.describe()}: {_engine_message(exc)}"
            return _Verdict(None, message, _spec_bytes(spec) + len(message))
        return _Verdict(Constraint(spec, grammar, self.vocab_size), None,
                        _spec_bytes(spec) + grammar.memory_size_bytes)

    def _keep(self, spec: ConstraintSpec, verdict: _Verdict) -> None:
        """Cache `verdict` (lock held), evicting the least recently used entries to stay within the budget."""
        old = self._cache.pop(spec, None)
        if old is not None:
            self.num_cached_bytes -= old.nbytes
        if verdict.nbytes > self.cache_bytes:
            return
        self._cache[spec] = verdict
        self.num_cached_bytes += verdict.nbytes
        while self.num_cached_bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self.num_cached_bytes -= evicted.nbytes

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
            if isinstance(spec, StructuralTag):
                return self._compiler.compile_structural_tag(spec.text)
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


def _accepts_nothing(grammar: xgr.CompiledGrammar, vocab_size: int) -> bool:
    """True if no output satisfies the grammar. From the start, follow the text every output must begin with
    (xgrammar's jump-forward string) until a choice appears: if at some point no token, not even a stop token, is
    allowed, every output dead-ends there. A grammar that branches first is accepted (a dead end after a choice is
    the engine's to report, for that request only)."""
    matcher = xgr.GrammarMatcher(grammar)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    stop_ids = grammar.tokenizer_info.stop_token_ids
    for _ in range(_MAX_FORCED_STEPS):
        matcher.fill_next_token_bitmask(bitmask)
        if not matcher.is_completed():  # a stop token counts only where the output is complete (matcher.py)
            clear_token_bits(bitmask[0], stop_ids)
        if not bool(bitmask.any()):
            return True
        forced = matcher.find_jump_forward_string()
        if not forced or not matcher.accept_string(forced):
            return False
    return False


def _spec_bytes(spec: ConstraintSpec) -> int:
    """About what holding the spec (a cache key) costs."""
    if isinstance(spec, JsonSchema):
        return len(spec.text)
    if isinstance(spec, Regex):
        return len(spec.pattern)
    if isinstance(spec, Grammar):
        return len(spec.ebnf)
    if isinstance(spec, Choice):
        return sum(len(o) for o in spec.options)
    if isinstance(spec, StructuralTag):
        return len(spec.text)
    return 0


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
