"""LLM.chat with tools on the real default model (SmolLM2, whose template ignores `tools`: the fallback prompt).
Every finished call names an offered tool and its arguments validate against that tool's schema, in every
tool_choice mode; parallel_tool_calls false and a named function allow exactly one call."""
import json

import jsonschema
import pytest

from freehold.llm import Completion
from freehold.tools.prompt import FALLBACK_SYNTAX
from freehold.types import FinishReason, SamplingParams

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                     "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
GREEDY = SamplingParams(max_tokens=100, temperature=0)
# auto: SmolLM2-135M rarely starts a call on its own; nudge it toward "<" and away from echoing "<tool_response>"
# (the tokens of "<tool_call>" are "<", "tool", "_", "call", ">"; the grammar does the rest)
NUDGE = {"<": 3.0, "response": -100.0}
# an earlier turn: the model called get_weather, got a result, answered
HISTORY = [
    {"role": "user", "content": "What's the weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "21 degrees and sunny"},
]


def assert_valid_calls(completion: Completion) -> None:
    """Every call names an offered tool with arguments valid for its schema; the output ended after the calls."""
    assert completion.finish_reason is FinishReason.STOP, completion.text
    for call in completion.tool_calls:
        assert call.name in SCHEMAS and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def chat(llm, messages, **tools):
    return llm.chat(messages, GREEDY, tools=TOOLS, **tools)[0].completions[0]


def test_required_parallel_calls_validate(default_llm):
    completion = chat(default_llm, ASK, tool_choice="required")
    assert_valid_calls(completion)
    assert len(completion.tool_calls) >= 1 and completion.content is None
    assert len({c.id for c in completion.tool_calls}) == len(completion.tool_calls)


@pytest.mark.parametrize("choice,name", [("required", None),
                                         ({"type": "function", "function": {"name": "get_time"}}, "get_time")])
def test_single_call_modes_make_exactly_one_call(default_llm, choice, name):
    completion = chat(default_llm, ASK, tool_choice=choice, parallel_tool_calls=False)
    assert_valid_calls(completion)
    assert len(completion.tool_calls) == 1 and (name is None or completion.tool_calls[0].name == name)


def test_auto_call_after_history_validates(default_llm):
    """auto: the model starts the call itself (nudged); from "<tool_call>" on, the grammar finishes it."""
    messages = HISTORY + [{"role": "assistant", "content": "It is 21 degrees and sunny in Rome."},
                          {"role": "user", "content": "And what's the weather in Oslo?"}]
    bias = {default_llm.tokenizer.token_to_id(t): b for t, b in NUDGE.items()}
    params = SamplingParams(max_tokens=64, temperature=0, logit_bias=bias)
    completion = default_llm.chat(messages, params, tools=TOOLS, parallel_tool_calls=False)[0].completions[0]
    assert_valid_calls(completion)
    assert [c.name for c in completion.tool_calls] == ["get_weather"]


def test_history_round_trip_renders_results_and_answers(default_llm):
    prompt = default_llm.tokenizer.decode(default_llm.chat_prompt(HISTORY, tools=None))
    assert "<tool_response>\n21 degrees and sunny\n</tool_response>" in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}' in prompt
    completion = chat(default_llm, HISTORY, tool_choice="auto")
    assert completion.finish_reason is FinishReason.LENGTH or completion.finish_reason is FinishReason.STOP
    for call in completion.tool_calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_none_shows_no_tools_and_reads_no_calls(default_llm):
    from freehold.tools.spec import tool_request
    prompt = default_llm.tokenizer.decode(default_llm.chat_prompt(ASK, tool_request(TOOLS, "none", None)))
    assert FALLBACK_SYNTAX not in prompt and "get_weather" not in prompt
    shown = default_llm.tokenizer.decode(default_llm.chat_prompt(ASK, tool_request(TOOLS, "auto", None)))
    assert FALLBACK_SYNTAX in shown
    completion = default_llm.chat(ASK, SamplingParams(max_tokens=8, temperature=0), tools=TOOLS,
                                  tool_choice="none")[0].completions[0]
    assert completion.tool_calls == [] and completion.content == completion.text
