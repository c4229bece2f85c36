"""tools / tool_choice / parallel_tool_calls validation (each bad input names its field), and the fallback prompt
and history rendering for a template that ignores `tools`."""
import json

import pytest

from freehold.errors import InvalidRequestError
from freehold.tools.parse import parse_tool_calls
from freehold.tools.prompt import FALLBACK_SYNTAX, template_tools, tool_messages
from freehold.tools.spec import ToolChoiceMode, tool_request


def tool(name, parameters=None, description="does things"):
    function = {"name": name, "description": description}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


WEATHER = tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


def test_modes_and_defaults():
    assert tool_request(None, None, None) is None
    assert tool_request([], "none", None) is None
    assert tool_request([], "auto", None) is None
    auto = tool_request([WEATHER, tool("noop")], None, None)
    assert auto.mode is ToolChoiceMode.AUTO and auto.parallel and auto.max_calls is None
    assert auto.tools[1].parameters.schema == {"type": "object"}
    named = tool_request([WEATHER, tool("noop")], {"type": "function", "function": {"name": "noop"}}, None)
    assert named.mode is ToolChoiceMode.FUNCTION and [t.name for t in named.callable_tools] == ["noop"]
    assert named.max_calls == 1
    single = tool_request([WEATHER], "required", False)
    assert single.mode is ToolChoiceMode.REQUIRED and single.max_calls == 1
    assert tool_request([WEATHER], "none", None).callable_tools == ()


@pytest.mark.parametrize("tools,choice,param,words", [
    ([{"type": "function", "function": {"description": "x"}}], None, "tools[0].function.name", "no name"),
    ([WEATHER, tool("get_weather")], None, "tools[1].function.name", "repeats"),
    ([tool("has space")], None, "tools[0].function.name", "letters, digits"),
    ([tool("f", {"type": "string"})], None, "tools[0].function.parameters", "object"),
    ([tool("f", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}})], None,
     "tools[0].function.parameters", "'not'"),
    ([tool("f", {"type": "object", "required": ["a"]})], None, "tools[0].function.parameters", "does not declare"),
    ([WEATHER], {"type": "function", "function": {"name": "other"}}, "tool_choice.function.name", "not among"),
    ([], "required", "tool_choice", "no tools"),
    (None, {"type": "function", "function": {"name": "f"}}, "tool_choice.function.name", "not among"),
    ([WEATHER], "sometimes", "tool_choice", "must be"),
])
def test_bad_requests_name_the_field(tools, choice, param, words):
    with pytest.raises(InvalidRequestError) as info:
        tool_request(tools, choice, None)
    assert info.value.param == param and words in str(info.value)


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21C"}]},
]


def test_fallback_renders_tools_calls_and_results():
    request = tool_request([WEATHER], None, None)
    out = tool_messages(HISTORY, request, template_handles_tools=False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    system = out[0]["content"]
    assert system.startswith("Be brief.\n\n") and FALLBACK_SYNTAX in system
    assert json.dumps(WEATHER["function"]["parameters"]) in system
    content, calls = parse_tool_calls(out[2]["content"])  # history calls in the very syntax the model writes
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert out[3]["content"] == "<tool_response>\n18C\n</tool_response>\n<tool_response>\n21C\n</tool_response>"
    # tool_choice none: the tools are not shown, the history still is
    quiet = tool_messages(HISTORY, tool_request([WEATHER], "none", None), template_handles_tools=False)
    assert quiet[0]["content"] == "Be brief." and quiet[2] == out[2]


def test_native_template_gets_tool_role_and_argument_mappings():
    request = tool_request([WEATHER], None, None)
    out = tool_messages(HISTORY, request, template_handles_tools=True)
    assert out[0]["content"] == "Be brief."
    assert out[2]["tool_calls"][1]["function"] == {"name": "get_weather", "arguments": {"city": "Rome"}}
    assert out[3] == {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18C"}
    assert template_tools(request)[0]["function"]["name"] == "get_weather"
    assert template_tools(tool_request([WEATHER], "none", None)) is None


def test_no_system_message_gets_one():
    out = tool_messages([{"role": "user", "content": "hi"}], tool_request([WEATHER], "required", False), False)
    assert out[0]["role"] == "system" and "at least one" in out[0]["content"] and "at most one" in out[0]["content"]


@pytest.mark.parametrize("index,change,param", [
    (3, {"tool_call_id": "call_9"}, "messages[3].tool_call_id"),
    (2, {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]},
     "messages[2].tool_calls[0].function.arguments"),
    (2, {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]},
     "messages[2].tool_calls[0].function.arguments"),
])
def test_bad_history_names_the_field(index, change, param):
    messages = [dict(m) for m in HISTORY[:4]]
    messages[index].update(change)
    with pytest.raises(InvalidRequestError) as info:
        tool_messages(messages, tool_request([WEATHER], None, None), template_handles_tools=False)
    assert info.value.param == param


# the tool parts of Qwen2.5's template: tools listed as JSON, calls with `arguments | tojson`, the tool role
QWEN_LIKE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}{% set c = c.function %}<tool_call>{\"name\": \"{{ c.name }}\", \"arguments\": "
    "{{ c.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
)


def test_native_template_renders_the_history_once():
    from freehold.tokenizer.chat_template import ChatTemplate
    request = tool_request([WEATHER], None, None)
    text = ChatTemplate(QWEN_LIKE, {}).render(tool_messages(HISTORY, request, True), add_generation_prompt=False,
                                               tools=template_tools(request))
    assert text.count('"name": "get_weather"') == 3  # the tool list and the two calls
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>' in text
    assert "<tool_response>21C</tool_response>" in text and FALLBACK_SYNTAX not in text


@pytest.mark.parametrize("name, arguments, field", [
    ("get_weather", '{"city": "\ud800"}', "arguments"),  # a raw lone surrogate
    ("get_weather", '{"city": "\\ud800"}', "arguments"),  # the same as a JSON escape
    ("get_\ud800", "{}", "name"),
    ("get_weather", "[" * 50_000 + "]" * 50_000, "arguments"),  # nesting past the parser's recursion limit
])
def test_history_calls_that_cannot_be_rendered_are_400s_naming_the_field(name, arguments, field):
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    with pytest.raises(InvalidRequestError) as err:
        tool_messages(history, None, template_handles_tools=False)
    assert err.value.param == f"messages[1].tool_calls[0].function.{field}"
