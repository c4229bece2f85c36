"""What a constraint may cost before it runs: the compiled-grammar cache is bounded by bytes (xgrammar's own
measure), a grammar no output can satisfy is refused at compile time (and that verdict cached), and a schema
nested too deeply is a clean InvalidRequestError, never a RecursionError."""
import json

import pytest

from freehold.constrain.compiler import ConstraintCompiler
from freehold.constrain.spec import MAX_SCHEMA_DEPTH, JsonSchema, Regex
from freehold.errors import InvalidRequestError

VOCAB = 49152  # SmolLM2's


def enum_schema(n: int, tag: str = "v") -> JsonSchema:
    values = [f"{tag}-{i:06d}-{i * 7919 % 100003}" for i in range(n)]
    return JsonSchema.from_value({"type": "object", "properties": {"x": {"enum": values}}, "required": ["x"]})


def entry_bytes(compiler: ConstraintCompiler, spec) -> int:
    before = compiler.num_cached_bytes
    compiler.compile(spec)
    return compiler.num_cached_bytes - before


# -- the cache ---------------------------------------------------------------------------------------------------
def test_cache_is_bounded_by_bytes_and_evicts_least_recently_used(tokenizer, compiler):
    a, b, c = Regex("a"), Regex("b"), Regex("c")
    sizes = [entry_bytes(compiler, s) for s in (a, b, c)]
    assert all(s > 0 for s in sizes)
    small = ConstraintCompiler(tokenizer, VOCAB, cache_bytes=sizes[0] + max(sizes[1:]) + min(sizes) // 2)
    first = small.compile(a)
    assert small.compile(Regex("a")) is first and small.num_compiled == 1
    small.compile(b)
    small.compile(a)  # a is now the most recent
    small.compile(c)  # no room for three: evicts b
    assert small.cached(a) and small.cached(c) and not small.cached(b)
    assert small.num_compiled == 3 and small.num_cached_bytes <= small.cache_bytes


def test_a_large_grammar_costs_its_bytes_not_one_entry(tokenizer, compiler):
    """One huge-enum schema takes MiBs (xgrammar's memory_size_bytes): it pushes out many small grammars, and one
    larger than the whole budget is compiled and used but not kept."""
    big = enum_schema(2000)
    big_bytes = entry_bytes(compiler, big)
    assert big_bytes > 1 << 20
    small_specs = [Regex(f"x{i}") for i in range(10)]
    cache = ConstraintCompiler(tokenizer, VOCAB, cache_bytes=big_bytes + 4096)
    for spec in small_specs:
        cache.compile(spec)
    assert all(cache.cached(s) for s in small_specs)
    cache.compile(big)
    assert cache.cached(big) and sum(cache.cached(s) for s in small_specs) < len(small_specs)
    assert cache.num_cached_bytes <= cache.cache_bytes
    tight = ConstraintCompiler(tokenizer, VOCAB, cache_bytes=big_bytes // 2)
    assert tight.compile(big).spec == big
    assert not tight.cached(big) and tight.num_cached_bytes == 0


# -- grammars that accept nothing ------------------------------------------------------------------------------------
EMPTY_PATTERN = {"type": "object", "properties": {"s": {"type": "string", "pattern": "[^\\s\\S]"}}, "required": ["s"]}


@pytest.mark.parametrize("spec", [
    Regex("[^\\s\\S]"),
    Regex("abc[^\\s\\S]"),  # dead end after a forced prefix
    JsonSchema.from_value(EMPTY_PATTERN),  # a required string whose pattern matches nothing
], ids=["empty-class", "after-prefix", "required-empty-pattern"])
def test_a_grammar_no_output_satisfies_is_rejected_and_the_verdict_cached(tokenizer, spec):
    fresh = ConstraintCompiler(tokenizer, VOCAB)
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="no output satisfies it"):
            fresh.compile(spec)
    assert fresh.num_compiled == 1 and fresh.cached(spec)


@pytest.mark.parametrize("spec", [
    Regex(""),  # only the empty string: a stop token at once
    Regex("a*"),
    Regex("abc"),
    JsonSchema.from_value({**EMPTY_PATTERN, "required": []}),  # the impossible property is optional
    JsonSchema.from_value({"type": "object", "properties": {"s": {"type": "string", "pattern": "[a-z]+"}},
                           "required": ["s"]}),
])
def test_grammars_with_outputs_are_accepted(compiler, spec):
    assert compiler.compile(spec).spec == spec


# -- deep schemas ----------------------------------------------------------------------------------------------------
def nested_schema_text(levels: int) -> str:
    """A chain of objects at most `levels` JSON levels deep (a property's schema is two levels below its object)."""
    repeats = (levels - 1) // 2
    return '{"type":"object","properties":{"a":' * repeats + '{"type":"string"}' + "}}" * repeats


@pytest.mark.parametrize("levels", [MAX_SCHEMA_DEPTH + 2, 900, 5000])
def test_a_schema_string_nested_too_deeply_is_a_clean_error(levels):
    with pytest.raises(InvalidRequestError, match="levels deep"):
        JsonSchema.from_value(nested_schema_text(levels))


@pytest.mark.parametrize("levels", [MAX_SCHEMA_DEPTH + 2, 900])
def test_a_schema_object_nested_too_deeply_is_a_clean_error(levels):
    with pytest.raises(InvalidRequestError, match="levels deep"):
        JsonSchema.from_value(json.loads(nested_schema_text(levels)))


def test_a_schema_at_the_depth_limit_compiles(compiler):
    spec = JsonSchema.from_value(nested_schema_text(MAX_SCHEMA_DEPTH))
    assert compiler.compile(spec).spec == spec


def test_a_cached_bad_spec_raises_a_fresh_error_each_time(compiler):
    """One shared exception object would collect every raise's frames in its traceback (and keep each request's
    spec alive): repeating an impossible schema must not grow memory."""
    errors = []
    for _ in range(5):
        with pytest.raises(InvalidRequestError, match="language is empty") as info:
            compiler.compile(Regex("x[^\\s\\S]"))
        errors.append(info.value)
    assert len({id(e) for e in errors}) == len(errors)
    depth = lambda tb: 0 if tb is None else 1 + depth(tb.tb_next)  # noqa: E731
    assert len({depth(e.__traceback__) for e in errors[1:]}) == 1
