"""Constraint specs and their compilation with the default model's tokenizer: errors that name what is unsupported,
choice escaping, special and stop tokens in the bitmask, and the JSON Schema support rules."""
import json

import pytest
import torch
import xgrammar as xgr

from freehold.constrain.compiler import ConstraintCompiler, choice_ebnf
from freehold.constrain.matcher import BitmaskFiller, GrammarState
from freehold.constrain.schema_support import check_schema_support
from freehold.constrain.spec import Choice, Grammar, JsonObject, JsonSchema, Regex
from freehold.errors import InvalidRequestError
from freehold.tokenizer import Tokenizer

VOCAB = 49152  # SmolLM2's


def allowed(state: GrammarState) -> torch.Tensor:
    """bool [V]: the tokens the state's bitmask allows next."""
    bitmask = BitmaskFiller(VOCAB, max_threads=1).fill([state])[0]
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:VOCAB].bool()


def feed(state: GrammarState, tokenizer: Tokenizer, text: str) -> None:
    for token in tokenizer.encode(text, add_special_tokens=False):
        state.accept(token)


# -- specs -----------------------------------------------------------------------------------------------------------
def test_json_schema_spec_is_canonical_and_keeps_property_order():
    a = JsonSchema.from_value({"type": "object", "properties": {"b": {}, "a": {}}})
    b = JsonSchema.from_value('{"type":  "object", "properties": {"b": {}, "a": {}}}')
    assert a == b and hash(a) == hash(b)
    assert list(a.schema["properties"]) == ["b", "a"]


@pytest.mark.parametrize("value,words", [("{not json", "not valid JSON"), ([1, 2], "must be an object"),
                                         ("\"\\ud800\"", "must be an object")])
def test_json_schema_spec_rejects_non_schemas(value, words):
    with pytest.raises(InvalidRequestError, match=words):
        JsonSchema.from_value(value)


def test_specs_reject_lone_surrogates_and_empty_choices():
    with pytest.raises(InvalidRequestError, match="surrogate"):
        Regex("a\ud800")
    with pytest.raises(InvalidRequestError, match="at least one"):
        Choice(())


# -- compiler --------------------------------------------------------------------------------------------------------
# the cache (bounded by bytes) is tested in test_constrain_limits.py
@pytest.mark.parametrize("spec,words", [
    (Regex("(abc"), "regex"),
    (Regex("(?=a)b"), "Lookahead"),
    (Grammar("root ::= "), "EBNF parser error"),
    (Grammar('start ::= "a"'), "root"),
    (JsonSchema.from_value({"type": "foo"}), 'Unsupported type "foo"'),
])
def test_compile_errors_carry_the_engines_message(compiler, spec, words):
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(spec)
    message = str(info.value)
    assert message.startswith(f"cannot constrain the output to {spec.describe()}") and words in message
    assert ".cc:" not in message, "the C++ source location is noise to a client"


@pytest.mark.parametrize("schema,where,words", [
    ({"not": {"type": "string"}}, "/", "'not'"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "/properties/a", "uniqueItems"),
    ({"type": "number", "multipleOf": 0.5}, "/", "multipleOf"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "/", "allOf"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "/", "pattern"),
    ({"type": "object", "required": ["id"]}, "/", "'id'"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "/", "oneOf"),
    ({"$ref": "https://example.com/s.json"}, "/", "non-local"),
    ({"type": "object", "properties": {"x": {"type": "object", "dependencies": {"a": ["b"]}}}}, "/properties/x",
     "dependencies"),
])
def test_unenforced_schema_features_are_rejected_with_their_location(compiler, schema, where, words):
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(JsonSchema.from_value(schema))
    assert f"at '{where}'" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}, "required": ["not"]},
    {"oneOf": [{"type": "integer"}, {"type": "string"}, {"$ref": "#/$defs/n"}], "$defs": {"n": {"type": "null"}}},
    {"type": "integer", "multipleOf": 5},
    {"$defs": {"a": {"type": "boolean"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}},
])
def test_supported_schemas_pass_the_support_check(compiler, schema):
    check_schema_support(schema)
    compiler.compile(JsonSchema.from_value(schema))


@pytest.mark.parametrize("schema,violation", [
    ({"not": {"type": "string"}}, '"x"'),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    ({"type": "string", "pattern": "^[a-z]+$", "minLength": 3}, '"ab"'),
    ({"type": "object", "required": ["zz"]}, "{}"),
])
def test_rejected_features_are_ones_xgrammar_would_not_enforce(compiler, schema, violation):
    """Why the support rules exist: xgrammar compiles these but accepts an instance that breaks them. If a newer
    xgrammar enforces one, this fails and the rule in schema_support.py can go."""
    raw = xgr.GrammarCompiler(compiler.tokenizer_info, cache_enabled=False)
    matcher = xgr.GrammarMatcher(raw.compile_json_schema(json.dumps(schema), any_whitespace=False))
    assert matcher.accept_string(violation) and matcher.is_completed()


def test_choice_ebnf_escapes_quotes_backslashes_and_newlines(compiler, tokenizer):
    options = ('say "hi"', "back\\slash", "two\nlines", "café ☕", "")
    assert choice_ebnf(("a", "b")) == 'root ::= "a" | "b"'
    constraint = compiler.compile(Choice(options))
    for option in options:
        matcher = xgr.GrammarMatcher(constraint.grammar)
        assert matcher.accept_string(option) and matcher.is_completed(), option
    assert not xgr.GrammarMatcher(constraint.grammar).accept_string("say hi")


# -- tokens ----------------------------------------------------------------------------------------------------------
def test_special_tokens_never_allowed_and_stop_tokens_only_when_complete(compiler, tokenizer):
    state = GrammarState(compiler.compile(Regex("[a-z<|>_]+")))
    start = allowed(state)
    stops = list(tokenizer.eos_token_ids)
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert not start[im_start], "a chat marker must not appear inside constrained text"
    assert not start[stops].any(), "an empty output does not match [a-z]+"
    assert start[tokenizer.encode("abc", add_special_tokens=False)[0]]
    feed(state, tokenizer, "abc")
    assert allowed(state)[stops].all(), "a complete match may end"
    state.accept(stops[0])
    assert state.terminated and state.num_accepted == len(tokenizer.encode("abc", add_special_tokens=False)) + 1


def test_json_object_allows_any_object_but_nothing_else(compiler, tokenizer):
    constraint = compiler.compile(JsonObject())
    assert xgr.GrammarMatcher(constraint.grammar).accept_string('{"a": [1, {"b": null}], "c": "d"}')
    assert not xgr.GrammarMatcher(constraint.grammar).accept_string("[1]")


def test_a_refused_token_is_an_engine_bug_not_silence(compiler, tokenizer):
    state = GrammarState(compiler.compile(Regex("[0-9]+")))
    with pytest.raises(RuntimeError, match="refused token"):
        state.accept(tokenizer.encode("x", add_special_tokens=False)[0])
