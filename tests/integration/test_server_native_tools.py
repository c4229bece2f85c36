"""A chat template that renders `tools` itself (issue 14, point 2): served with `--chat-template` (a Qwen2.5-style
tool template, tests/data/chat_templates/qwen_tools.jinja) on the default model and weights.

The template, not the fallback, shows the tools, the earlier calls and their results; the calls the model makes are
still constrained to the offered tools and their schemas, streamed or not.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import jsonschema
import openai
import pytest

from freehold.tools.prompt import FALLBACK_INTRO
from tests.integration.conftest import MODEL_NAME, ServerProcess, start_server, stop_server

TEMPLATE = Path(__file__).parent.parent / "data" / "chat_templates" / "qwen_tools.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_7", "content": "18 C and clear"}]


@pytest.fixture(scope="module")
def native_server() -> Iterator[ServerProcess]:
    s = start_server("--kv-cache-memory", "64M", "--max-model-len", "2048", "--chat-template", str(TEMPLATE))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(native_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=native_server.base_url, api_key="unused", max_retries=0, timeout=120)


def _prompt(server: ServerProcess, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, int]:
    """The rendered prompt text (tokenize, then detokenize) and its token count."""
    body = {"messages": messages, **({"tools": tools} if tools else {})}
    tokens = httpx.post(f"{server.url}/tokenize", json=body, timeout=60).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}, timeout=60).json()["prompt"]
    return text, len(tokens)


def test_the_template_renders_the_tools_not_the_fallback(native_server: ServerProcess) -> None:
    text, _ = _prompt(native_server, ASK, TOOLS)
    assert "# Tools" in text and FALLBACK_INTRO not in text
    listed = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in listed] == ["get_weather", "get_time"]


def test_history_is_rendered_in_the_templates_own_shape(native_server: ServerProcess,
                                                        client: openai.OpenAI) -> None:
    text, count = _prompt(native_server, HISTORY, TOOLS)
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>user\n<tool_response>\n18 C and clear\n</tool_response><|im_end|>" in text
    auto = client.chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=TOOLS, max_tokens=1)
    assert auto.usage.prompt_tokens == count  # /tokenize renders as the chat endpoint does
    answer = client.chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=16)
    assert answer.usage.prompt_tokens < count  # "none" shows no tools
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_calls_are_constrained_to_the_offered_tools(client: openai.OpenAI, tool_choice) -> None:
    choice = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                            temperature=0, max_tokens=60).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    if isinstance(tool_choice, dict):
        assert {c.function.name for c in choice.message.tool_calls} == {"get_time"}


def test_streamed_calls_equal_the_plain_ones(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=60)
    plain = client.chat.completions.create(**kwargs).choices[0].message
    with client.chat.completions.stream(**kwargs) as stream:
        streamed = stream.get_final_completion().choices[0].message
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in plain.tool_calls]
