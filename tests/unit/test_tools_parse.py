"""Reading calls out of text: parse_tool_calls on whole texts, and ToolCallStream's events adding up to exactly the
same content and calls for any way of splitting the text."""
import random

import pytest

from freehold.tools.parse import (ArgumentsDelta, CallStart, ContentDelta, ToolCallStream, format_call,
                                  parse_tool_calls)

TEXTS = [
    'Sure.\n<tool_call>{"name": "f", "arguments": {"a": "x}"}}</tool_call>\n<tool_call>{"name": "g-2", '
    '"arguments": {}}</tool_call>',
    "plain text, no call  \n",
    'a <tool_call>not a call</tool_call> b <tool_call>{"name": "f", "arguments": {"b": [1, 2]} }</tool_call> tail ',
    '<tool_call>{"name":"f","arguments":{"x":1}}</tool_call><tool_call>{"name": "h", "arguments": {"y": "<"',
    '<tool_call>{"name": "f", "arguments": </tool_call> x <tool_call>{"name": "f"',
    "text ending in half a tag <tool_ca",
    '<tool_call>{"name": "q", "arguments": {"s": "  }  </tool_"} } </tool_call>',
]


def streamed(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    stream, events = ToolCallStream(), []
    for piece in pieces:
        events += stream.push(piece)
    events += stream.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, CallStart):
            assert e.index == len(calls) and e.id.startswith("call_") and len(e.id) == 29
            calls[e.index] = [e.name, ""]
        elif isinstance(e, ArgumentsDelta):
            calls[e.index][1] += e.text
    return content, [(name, args) for name, args in calls.values()]


def whole(text: str) -> tuple[str, list[tuple[str, str]]]:
    content, calls = parse_tool_calls(text)
    return content, [(c.name, c.arguments) for c in calls]


def test_parse_reads_calls_content_and_arguments_as_written():
    content, calls = parse_tool_calls(TEXTS[0])
    assert content == "Sure."
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"a": "x}"}'), ("g-2", "{}")]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert whole(TEXTS[2]) == ("a <tool_call>not a call</tool_call> b tail", [("f", '{"b": [1, 2]}')])
    assert whole(TEXTS[3])[1] == [("f", '{"x":1}'), ("h", '{"y": "<"')]  # the second one cut off: all its text
    assert whole(TEXTS[4]) == (TEXTS[4], [])  # no head, no call
    assert whole("no calls at all \n") == ("no calls at all", [])


def test_format_call_round_trips():
    text = format_call("get_weather", '{"city": "Paris"}') + "\n" + format_call("t", "{}")
    assert whole(text) == ("", [("get_weather", '{"city": "Paris"}'), ("t", "{}")])


@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_parse_for_random_splits(text):
    expected = whole(text)
    assert streamed([text]) == expected
    assert streamed(list(text)) == expected  # one character at a time
    rng = random.Random(len(text))
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(1, min(10, len(text)))))
        assert streamed([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]) == expected


def test_stream_sends_arguments_before_the_call_ends():
    stream = ToolCallStream()
    events = stream.push('Hi <tool_call>{"name": "f", "arguments": {"city": "Pa')
    assert events[0] == ContentDelta("Hi")
    assert isinstance(events[1], CallStart) and events[1].name == "f"
    assert events[2] == ArgumentsDelta(0, '{"city": "Pa')
    assert stream.push('ris"}}</tool_') == [ArgumentsDelta(0, 'ris"}')]
    assert stream.push("call>") == [] and stream.finish() == []
