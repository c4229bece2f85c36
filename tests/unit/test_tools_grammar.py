"""The tool-call constraint, compiled for the default model's tokenizer: which texts each mode lets through, that
the grammar is complete (so the stop token may follow) exactly after a finished set of calls, and that the
compiler's empty-language check accepts every mode."""
import pytest
import xgrammar as xgr

from freehold.constrain.compiler import _accepts_nothing
from freehold.tools.grammar import tool_constraint
from freehold.tools.parse import format_call
from freehold.tools.spec import tool_request

VOCAB = 49152
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "noop"}},
]
PARIS = format_call("get_weather", '{"city": "Paris"}')
NOOP = format_call("noop", "{}")


def complete(compiled, text: str) -> bool:
    """True if the grammar accepts `text` as a whole output (the stop token may follow it)."""
    matcher = xgr.GrammarMatcher(compiled.grammar)
    return matcher.accept_string(text) and matcher.is_completed()


def constraint(compiler, choice, parallel=None):
    return compiler.compile(tool_constraint(tool_request(TOOLS, choice, parallel)))


@pytest.mark.parametrize("choice,parallel,accepted,refused", [
    ("auto", None, ["", "Just text.", PARIS, f"Let me check. {PARIS}\n{NOOP}"],
     [format_call("other", "{}"), format_call("get_weather", '{"town": "Paris"}'),
      format_call("get_weather", '{"city": 3}'), format_call("get_weather", '{"city": "a</tool_call>"}')]),
    ("auto", False, ["Just text.", PARIS], [f"{PARIS}\n{NOOP}", f"{PARIS} and more"]),
    ("required", None, [PARIS, f"{PARIS}\n{NOOP}", f"{NOOP}\n{NOOP}"], ["", "Just text.", f"{PARIS} text"]),
    ("required", False, [PARIS, NOOP], [f"{PARIS}\n{NOOP}", ""]),
    ({"type": "function", "function": {"name": "noop"}}, None, [NOOP], [PARIS, f"{NOOP}\n{NOOP}", ""]),
])
def test_modes(compiler, choice, parallel, accepted, refused):
    compiled = constraint(compiler, choice, parallel)
    for text in accepted:
        assert complete(compiled, text), text
    for text in refused:
        assert not complete(compiled, text), text


def test_arguments_whitespace_is_bounded(compiler):
    compiled = constraint(compiler, "required")
    assert complete(compiled, format_call("get_weather", '{ "city": "Paris", "days": 2 }'))
    assert not complete(compiled, format_call("get_weather", '{"city":   "Paris"}'))


def test_none_is_unconstrained_and_every_mode_passes_the_empty_language_check(compiler):
    assert tool_constraint(tool_request(TOOLS, "none", None)) is None
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        for parallel in (True, False):
            assert not _accepts_nothing(constraint(compiler, choice, parallel).grammar, VOCAB)


def test_equal_requests_share_one_compiled_grammar(compiler):
    before = compiler.num_compiled
    constraint(compiler, "required", False)
    constraint(compiler, "required", False)
    assert compiler.num_compiled - before <= 1


def test_a_parameter_pattern_is_enforced_by_the_grammar(compiler):
    """The calculator's `expression` pattern (from its type hint) reaches the grammar: a constrained model can
    write only an arithmetic expression there, not the "}}</tool_call>" or leading "." the default model wrote."""
    from freehold.agent.builtin.calculator import calculator
    from freehold.agent.functions import function_tool
    compiled = compiler.compile(tool_constraint(tool_request([function_tool(calculator).as_openai()], "required",
                                                             None)))
    for expression in ["7339 * 5740", "(17 * 3 + 4) / 7", "2^10", "sqrt(16)", "-3 × 4", "−3 × 4"]:
        assert complete(compiled, format_call("calculator", f'{{"expression": "{expression}"}}')), expression
    for expression in ["}}", ".5 * 2", " 2 + 2", "", "2 = 4", "x\\n"]:
        assert not complete(compiled, format_call("calculator", f'{{"expression": "{expression}"}}')), expression
