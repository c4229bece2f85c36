"""What a request constrains its output to: typed, hashable specs (the compile cache's keys), and a compiled
`Constraint` as it travels inside `SamplingParams`.

    JsonObject     any JSON object                    (OpenAI response_format {"type": "json_object"})
    JsonSchema     an instance of a JSON Schema       (response_format json_schema, vLLM guided_json)
    Regex          a full match of a regex            (vLLM guided_regex)
    Grammar        a string of an EBNF/GBNF grammar   (vLLM guided_grammar; the start rule is `root`)
    Choice         exactly one of some strings        (vLLM guided_choice)
    StructuralTag  an xgrammar structural tag         (tool calls: freehold.tools.grammar builds one)

This module imports no grammar engine: `types.py` and the HTTP layer use it without loading xgrammar.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from freehold.errors import InvalidRequestError

# JSON levels a schema may nest (a property's schema is two levels below its object's): real schemas stay far below,
# and compile time grows steeply with depth (about 0.1 s at 128 levels, 2 s at 400 for a chain of objects).
MAX_SCHEMA_DEPTH = 128

if TYPE_CHECKING:
    import xgrammar


@dataclass(frozen=True)
class JsonObject:
    def describe(self) -> str:
        return "a JSON object"


@dataclass(frozen=True)
class JsonSchema:
    """`text` is the schema as compact JSON with its keys in the order given (properties are generated in that
    order), so equal schemas share one compiled grammar."""

    text: str

    def __post_init__(self) -> None:
        _check_unicode(self.text, "the JSON schema")

    @classmethod
    def from_value(cls, schema: Any) -> JsonSchema:
        """A schema given as a dict, or as a string holding one, nested at most MAX_SCHEMA_DEPTH levels."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
            except RecursionError:
                raise _too_deep() from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(f"a JSON schema must be an object, got {type(schema).__name__}")
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            raise _too_deep()
        return cls(json.dumps(schema, ensure_ascii=False, separators=(",", ":")))

    @property
    def schema(self) -> dict[str, Any] | bool:
        return json.loads(self.text)

    def describe(self) -> str:
        return "an instance of the JSON schema"


@dataclass(frozen=True)
class Regex:
    pattern: str

    def __post_init__(self) -> None:
        _check_unicode(self.pattern, "the regex")

    def describe(self) -> str:
        return f"a full match of the regex {self.pattern!r}"


@dataclass(frozen=True)
class Grammar:
    """EBNF in the GBNF dialect of llama.cpp (`root ::= ...`), as xgrammar reads it."""

    ebnf: str

    def __post_init__(self) -> None:
        _check_unicode(self.ebnf, "the grammar")

    def describe(self) -> str:
        return "a string of the grammar"


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise InvalidRequestError("a choice constraint needs at least one option")
        for option in self.options:
            _check_unicode(option, "a choice")

    def describe(self) -> str:
        return f"one of {len(self.options)} choices"


@dataclass(frozen=True)
class StructuralTag:
    """xgrammar's structural tag format (`{"type": "structural_tag", "format": ...}`) as compact JSON text; `what`
    says in errors what it constrains (e.g. "tool calls")."""

    text: str
    what: str = "a structural tag"

    def __post_init__(self) -> None:
        _check_unicode(self.text, "the structural tag")

    def describe(self) -> str:
        return self.what


def _depth(value: Any) -> int:
    """How many levels of objects and arrays `value` nests (iteratively: a deep value must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _too_deep() -> InvalidRequestError:
    return InvalidRequestError(f"the JSON schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep")


def _check_unicode(text: str, what: str) -> None:
    """JSON's \\uXXXX escapes can carry lone surrogates, which are not text and cannot reach the grammar engine."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{what} contains an unpaired surrogate at character {exc.start}: "
                                  "not valid Unicode text") from None


ConstraintSpec = JsonObject | JsonSchema | Regex | Grammar | Choice | StructuralTag


@dataclass(frozen=True)
class Constraint:
    """A spec compiled for one tokenizer (see `freehold.constrain.compiler`); the engine builds one grammar
    matcher per sequence from `grammar`. Compare constraints by `spec`."""

    spec: ConstraintSpec
    grammar: xgrammar.CompiledGrammar = field(compare=False, repr=False)
    vocab_size: int  # the size of the token bitmask: the model's vocabulary
