"""The chat endpoint's tool-call deltas (freehold.server.tool_calls) on CPU: however the generated text is split into
steps, the deltas follow OpenAI's chunk shape and add up to the non-streamed message."""
from __future__ import annotations

from freehold.server.tool_calls import StreamedToolCalls, finish_reason, response_message
from freehold.types import FinishReason

TEXT = ('Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"city": "Tokyo"}}</tool_call>')


def _stream(pieces: list[str]) -> tuple[str | None, list[dict], bool]:
    """(content, calls, made_calls) accumulated from the deltas of `pieces`, checking each call delta's shape."""
    calls = StreamedToolCalls(1)
    content, built = None, []
    for i, piece in enumerate(pieces):
        for delta in calls.deltas(0, piece, finished=i == len(pieces) - 1):
            content = (content or "") + delta.content if delta.content is not None else content
            for call in delta.tool_calls or []:
                if call.index == len(built):  # the first delta of a call: id, type, name and arguments ""
                    assert call.id.startswith("call_") and call.type == "function" and call.function.arguments == ""
                    built.append({"name": call.function.name, "arguments": ""})
                else:
                    assert call.id is None and call.function.name is None and call.function.arguments
                    built[call.index]["arguments"] += call.function.arguments
    return content, built, calls.made_calls(0)


def test_any_split_rebuilds_the_whole_message() -> None:
    whole = response_message(TEXT, parse=True)
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.tool_calls]
    assert whole.content == "Let me look." and [c["name"] for c in expected] == ["get_weather", "get_time"]
    for size in (1, 2, 3, 5, 8, 13, len(TEXT)):
        pieces = [TEXT[i:i + size] for i in range(0, len(TEXT), size)]
        assert _stream(pieces) == (whole.content, expected, True), size


def test_only_calls_is_null_content_and_tool_calls_finish() -> None:
    text = TEXT[TEXT.index("<tool_call>"):]
    assert response_message(text, parse=True).content is None
    assert _stream([text])[0] is None
    assert finish_reason(FinishReason.STOP, made_calls=True) == "tool_calls"
    assert finish_reason(FinishReason.LENGTH, made_calls=True) == "length"


def test_without_parsing_the_tags_are_content() -> None:
    message = response_message(TEXT, parse=False)
    assert message.content == TEXT and message.tool_calls is None
