"""Constrained generation with the default model: across many sampled completions (temperature 1.0, batched), every
output of a regex, a choice and a small EBNF grammar matches, and outputs for a fixed sample of JSONSchemaBench
schemas (tests/data/jsonschema) parse and validate."""
import json
import re
from pathlib import Path

import jsonschema
import pytest

from freehold.constrain.compiler import ConstraintCompiler
from freehold.constrain.spec import Choice, ConstraintSpec, Grammar, JsonSchema, Regex
from freehold.eval.structured import messages_for
from freehold.types import FinishReason, SamplingParams

SCHEMAS = sorted((Path(__file__).parent.parent / "data" / "jsonschema").glob("*.json"))
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]{0,2}
"""


@pytest.fixture(scope="module")
def compiler(default_llm):
    return ConstraintCompiler(default_llm.tokenizer, default_llm.loaded.config.vocab_size)


def sample(llm, compiler, spec: ConstraintSpec, question: str, n: int, max_tokens: int) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1234, n=n, constraint=compiler.compile(spec))
    return llm.chat([{"role": "user", "content": question}], params)[0].completions


def test_regex_outputs_all_match(default_llm, compiler):
    pattern = r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}"
    completions = sample(default_llm, compiler, Regex(pattern), "Name a person and a year.", 16, 16)
    for c in completions:
        assert c.finish_reason is FinishReason.STOP and re.fullmatch(pattern, c.text), c.text


def test_choice_outputs_are_one_of_the_choices(default_llm, compiler):
    options = ("positive", "negative", "neutral", 'mixed "both"')
    completions = sample(default_llm, compiler, Choice(options), "Sentiment of: I love rainy days?", 16, 16)
    assert all(c.finish_reason is FinishReason.STOP and c.text in options for c in completions)
    assert len({c.text for c in completions}) > 1, "temperature 1.0 should not always pick the same choice"


def test_ebnf_grammar_outputs_all_parse(default_llm, compiler):
    completions = sample(default_llm, compiler, Grammar(ARITHMETIC), "Write an arithmetic expression.", 16, 24)
    finished = [c for c in completions if c.finish_reason is FinishReason.STOP]
    assert len(finished) >= 8
    for c in finished:
        assert re.fullmatch(r"[0-9+\-()]+", c.text) and _balanced(c.text), c.text
        eval(compile(c.text, "<expr>", "eval"), {"__builtins__": {}})  # noqa: S307 - digits, + - and parentheses
    for c in completions:
        if c.finish_reason is FinishReason.LENGTH:
            assert len(c.token_ids) == 24


@pytest.fixture(scope="module")
def schema_outputs(default_llm, compiler):
    """One batch: per schema a greedy completion (with a frequency penalty, which keeps the small model out of
    repetition loops: deterministic, and each finishes) and two sampled ones (temperature 1.0)."""
    schemas = [json.loads(p.read_text()) for p in SCHEMAS]
    greedy = [SamplingParams(max_tokens=112, temperature=0.0, frequency_penalty=1.0,
                             constraint=compiler.compile(JsonSchema.from_value(s))) for s in schemas]
    sampled = [SamplingParams(max_tokens=112, temperature=1.0, seed=i, n=2, repetition_penalty=1.2,
                              constraint=p.constraint) for i, p in enumerate(greedy)]
    prompts = [default_llm.chat_prompt(messages_for(s)) for s in schemas]
    generations = default_llm.generate(prompts + prompts, greedy + sampled)
    return {p.stem: (s, g, r) for p, s, g, r in zip(SCHEMAS, schemas, generations, generations[len(schemas):])}


@pytest.mark.parametrize("name", [p.stem for p in SCHEMAS])
def test_jsonschemabench_sample_outputs_validate(schema_outputs, name):
    schema, greedy, sampled = schema_outputs[name]
    assert greedy.completions[0].finish_reason is FinishReason.STOP, greedy.text
    jsonschema.validate(json.loads(greedy.text), schema)
    for c in sampled.completions:
        if c.finish_reason is FinishReason.STOP:
            jsonschema.validate(json.loads(c.text), schema)
        else:
            assert c.finish_reason is FinishReason.LENGTH and len(c.token_ids) == 112


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_eval_structured_counts_compiled_finished_and_valid(default_llm, compiler, tmp_path):
    from freehold.eval.structured import Settings, evaluate_subset, load_schemas
    for path in [p for p in SCHEMAS if p.stem in ("o25947", "o71425")]:  # short outputs
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "zz_unsupported.json").write_text(json.dumps({"type": "array", "uniqueItems": True}))
    cases = load_schemas(tmp_path, limit=None)
    report, results = evaluate_subset(default_llm, compiler, "sample", cases, Settings(48, frequency_penalty=1.0))
    assert (report.num_schemas, report.num_compiled) == (3, 2)
    assert "uniqueItems" in results[2].error and results[2].run is None
    assert report.num_valid == report.num_finished == 2
    assert report.ms_per_token > 0 and report.ms_per_token_free > 0
