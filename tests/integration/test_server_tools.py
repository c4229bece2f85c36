"""Tool calling through the server and the official openai client: every tool_choice mode, streamed and not, the
stream helper rebuilding exactly the non-streamed calls, parallel calls, a history round trip (call -> tool result
-> answer) and the bad inputs, each a 400 naming the field."""
from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from tests.integration.conftest import MODEL_NAME, ServerProcess, chat_400


def _tool(name: str, description: str, properties: dict) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description, "strict": True,
        "parameters": {"type": "object", "properties": properties, "required": list(properties),
                       "additionalProperties": False}}}


WEATHER = _tool("get_weather", "The current weather in a city",
                {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}})
CLOCK = _tool("get_time", "The local time in a city", {"city": {"type": "string", "maxLength": 20}})
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}]
GREEDY = {"temperature": 0, "max_tokens": 120}


def _past_call(i: int, name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


# two earlier turns that answered with a call: with them the tiny default model calls under "auto" too
EXAMPLES = [{"role": "user", "content": "What is the weather in Lima?"},
            _past_call(1, "get_weather", {"city": "Lima", "unit": "celsius"}),
            {"role": "user", "content": "What time is it in Rome?"}, _past_call(2, "get_time", {"city": "Rome"})]
NAMED = {"type": "function", "function": {"name": "get_time"}}
# (tool_choice, messages, extra fields): "none" writes prose until max_tokens; a stop string ends it ("stop"),
# since the stream helper raises on "length" when tools are given
MODES = {"auto": ("auto", ASK, {}),
         "auto, calling": ("auto", [*EXAMPLES, {"role": "user", "content": "What time is it in Tokyo?"}], {}),
         "required": ("required", ASK, {}),
         "none": ("none", ASK, {"stop": ["."]}),
         "named": (NAMED, ASK, {})}


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def _check_calls(message) -> None:
    """Every call is well-formed: an id, an offered name, arguments that parse and match that tool's schema."""
    for call in message.tool_calls or []:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("mode", list(MODES))
def test_each_tool_choice_streamed_rebuilds_the_non_streamed_answer(client: openai.OpenAI, mode: str) -> None:
    tool_choice, messages, extra = MODES[mode]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                                           **GREEDY, **extra).choices[0]
    _check_calls(whole.message)
    if mode == "none":
        assert whole.message.tool_calls is None and whole.message.content and whole.finish_reason == "stop"
    else:
        assert whole.finish_reason == ("tool_calls" if whole.message.tool_calls else "stop")
    if mode in ("required", "named", "auto, calling"):
        assert whole.message.tool_calls and whole.message.content is None
    if mode in ("named", "auto, calling"):
        assert [name for name, _ in _calls(whole.message)] == ["get_time"]
    with client.chat.completions.stream(model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                                        **GREEDY, **extra) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert _calls(streamed.message) == _calls(whole.message)
    assert streamed.message.content == whole.message.content
    assert streamed.finish_reason == whole.finish_reason
    for call in streamed.message.tool_calls or []:  # the helper parsed the arguments of these strict tools
        assert call.function.parsed_arguments == json.loads(call.function.arguments)


def test_streamed_call_chunks_have_openais_shape(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                                 stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    num_logprobs = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
    assert num_logprobs == chunks[-1].usage.completion_tokens  # none lost while a tag's text is held back
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and deltas[0].content is None
    calls = [call for d in deltas for call in d.tool_calls or []]
    seen: set[int] = set()
    for call in calls:
        if call.index not in seen:  # a call's first delta: its id, type and name, no arguments yet
            seen.add(call.index)
            assert call.id.startswith("call_") and call.type == "function"
            assert call.function.name in SCHEMAS and call.function.arguments == ""
        else:  # later ones only append arguments
            assert call.id is None and call.function.name is None and call.function.arguments
    assert seen == set(range(len(seen))) and seen
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_parallel_calls_and_at_most_one_without_them(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Get the weather in Paris, in Tokyo and in Lima."}]
    many = client.chat.completions.create(model=MODEL_NAME, messages=ask, tools=TOOLS, tool_choice="required",
                                          temperature=0, max_tokens=160).choices[0]
    _check_calls(many.message)
    assert many.finish_reason == "tool_calls" and len(many.message.tool_calls) >= 2
    assert len({c.id for c in many.message.tool_calls}) == len(many.message.tool_calls)
    one = client.chat.completions.create(model=MODEL_NAME, messages=ask, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, temperature=0, max_tokens=160).choices[0]
    _check_calls(one.message)
    assert one.finish_reason == "tool_calls" and len(one.message.tool_calls) == 1
    assert _calls(one.message) == _calls(many.message)[:1]


def test_history_round_trip_call_result_answer(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=ask, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           **GREEDY).choices[0]
    call = first.message.tool_calls[0]
    history = [*ask, first.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    answer = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=24)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    alone = client.chat.completions.create(model=MODEL_NAME, messages=ask, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=1)
    rendered = len(call.function.arguments) // 8 + len('{"temperature": 18, "sky": "clear"}') // 8
    assert answer.usage.prompt_tokens >= alone.usage.prompt_tokens + rendered  # the call and its result were in it


def _history(arguments: str = '{"city": "Paris", "unit": "celsius"}', call_id: str = "call_1") -> list[dict]:
    return [ASK[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "18 C"}]


BAD = [
    ("tool without a name", {"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]},
     "tools[0].function.name", "required"),
    ("duplicate name", {"tools": [WEATHER, CLOCK, WEATHER]}, "tools[2].function.name", "unique"),
    ("parameters not an object schema",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "object"),
    ("parameters with an unenforced feature",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
         "type": "object", "not": {"required": ["a"]}}}}]}, "tools[0].function.parameters", "'not'"),
    ("tool_choice names a missing function",
     {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}},
     "tool_choice.function.name", "launch"),
    ("required with no tools", {"tool_choice": "required"}, "tool_choice", "no tools"),
    ("tool message answering no call", {"messages": _history(call_id="call_9")}, "messages[2].tool_call_id",
     "call_9"),
    ("history arguments not JSON", {"messages": _history(arguments="{city: Paris")},
     "messages[1].tool_calls[0].function.arguments", "JSON"),
    ("tool message without tool_call_id", {"messages": [ASK[0], {"role": "tool", "content": "18 C"}]},
     "messages[1].tool_call_id", "tool_call_id"),
    ("null content on a user message", {"messages": [{"role": "user", "content": None}]}, "messages[0].content",
     "content"),
    ("legacy functions", {"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions", "tools"),
    ("legacy function_call", {"function_call": "auto"}, "function_call", "tool_choice"),
    ("tools with response_format", {"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format",
     "tool_choice"),
]


@pytest.mark.parametrize("body,param,words", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_tool_inputs_are_400s_naming_the_field(server: ServerProcess, body: dict, param: str,
                                                   words: str) -> None:
    error = chat_400(server, ASK, body)
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_bad_requests_leave_a_running_call_alone(server: ServerProcess, client: openai.OpenAI) -> None:
    alone = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                           **GREEDY).choices[0]

    async def together() -> tuple:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                                      timeout=120) as aclient, httpx.AsyncClient(timeout=60) as http:
            running = aclient.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS,
                                                      tool_choice="required", **GREEDY)
            bad = [http.post(f"{server.base_url}/chat/completions",
                             json={"model": MODEL_NAME, "messages": ASK, "max_tokens": 8, **case[1]}) for case in BAD]
            return await asyncio.gather(running, *bad)

    running, *bad = asyncio.run(together())
    assert [r.status_code for r in bad] == [400] * len(BAD)
    assert _calls(running.choices[0].message) == _calls(alone.message)
    assert server.wait_idle()["kv_blocks_used"] == 0


def test_a_call_cut_by_max_tokens_says_length(client: openai.OpenAI) -> None:
    """The grammar makes every finished call well-formed; a call cut off by max_tokens is reported as cut off."""
    choice = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=20).choices[0]
    assert choice.finish_reason == "length"
    call = choice.message.tool_calls[0]
    assert call.function.name in SCHEMAS
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)
