"""Tool calling in the chat endpoint: OpenAI's `tools` / `tool_choice` / `parallel_tool_calls` -> a `ToolRequest`
(validated by `freehold.tools`) and the constraint that makes every call well-formed; the generated text -> the
response's `message.tool_calls`, or streamed `delta.tool_calls` in OpenAI's chunk shape:

    {"tool_calls": [{"index": 0, "id": "call_...", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\\"city\\": "}}]}           (appended, in order)

A choice that made calls finishes with "tool_calls" (unless max_tokens cut it: "length"); its content is null when
the model wrote nothing else. With `tool_choice: "none"` the output is not parsed for calls.
"""
from __future__ import annotations

from typing import Any

from freehold.errors import InvalidRequestError
from freehold.server.protocol import (AssistantMessage, ChatCompletionRequest, ChatDelta, DeltaFunctionCall,
                                      DeltaToolCall, ResponseFunctionCall, ResponseToolCall)
from freehold.server.structured import RequestedConstraint
from freehold.tokenizer import Tokenizer
from freehold.tools import prompt
from freehold.tools.grammar import tool_constraint
from freehold.tools.parse import ArgumentsDelta, CallStart, ContentDelta, ToolCallStream, ToolEvent, parse_tool_calls
from freehold.tools.spec import ToolChoiceMode, ToolRequest, tool_request
from freehold.types import FinishReason


def requested_tools(body: ChatCompletionRequest) -> ToolRequest | None:
    """The request's tools and tool_choice, validated (errors name the field, e.g. tools[1].function.name)."""
    tools = None if body.tools is None else [t.model_dump(exclude_none=True) for t in body.tools]
    choice = body.tool_choice
    choice = choice.model_dump() if choice is not None and not isinstance(choice, str) else choice
    return tool_request(tools, choice, body.parallel_tool_calls)


def parses_calls(tools: ToolRequest | None) -> bool:
    """Whether the output may hold calls (and is parsed for them): tools offered and tool_choice not "none"."""
    return tools is not None and tools.mode is not ToolChoiceMode.NONE


def request_constraint(tools: ToolRequest | None,
                       structured: RequestedConstraint | None) -> RequestedConstraint | None:
    """The one constraint of the request: the tool-call grammar, or the structured output one. Both at once is a
    400: the output is either free text with calls or an instance of the response format."""
    spec = tool_constraint(tools)
    if spec is None:
        return structured
    if structured is not None:
        raise InvalidRequestError(f"{structured.param} cannot be combined with tools unless tool_choice is 'none'",
                                  param=structured.param)
    return RequestedConstraint(spec, "tools")


def prompt_messages(messages: list[dict[str, Any]], tools: ToolRequest | None,
                    tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """The messages with the offered tools, earlier calls and their results rendered for this model's template
    (checks that each tool message answers an earlier call and that earlier arguments are JSON)."""
    if tools is None and not any("tool_calls" in m or m["role"] == "tool" for m in messages):
        return messages
    return prompt.tool_messages(messages, tools, prompt.template_handles_tools(tokenizer))


def template_tools(tools: ToolRequest | None, tokenizer: Tokenizer) -> list[dict] | None:
    """The `tools` variable for a template that renders tools itself (None for the fallback, which put them in the
    system message)."""
    return prompt.template_tools(tools) if prompt.template_handles_tools(tokenizer) else None


def response_message(text: str, parse: bool) -> AssistantMessage:
    """The assistant message of a finished choice: content, and the calls when the request offered tools."""
    if not parse:
        return AssistantMessage(content=text)
    content, calls = parse_tool_calls(text)
    if not calls:
        return AssistantMessage(content=content)
    return AssistantMessage(content=content or None, tool_calls=[
        ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments)) for c in calls])


def finish_reason(reason: FinishReason | None, made_calls: bool) -> str | None:
    if reason is FinishReason.STOP and made_calls:
        return "tool_calls"
    return reason.value if reason is not None else None


class StreamedToolCalls:
    """One `ToolCallStream` per choice: each text delta becomes content and tool-call deltas."""

    def __init__(self, num_choices: int):
        self._streams = [ToolCallStream() for _ in range(num_choices)]
        self._made_calls = [False] * num_choices

    def deltas(self, index: int, text: str, finished: bool) -> list[ChatDelta]:
        stream = self._streams[index]
        events = stream.push(text) if text else []
        if finished:
            events += stream.finish()
        if any(isinstance(e, CallStart) for e in events):
            self._made_calls[index] = True
        return _chat_deltas(events)

    def made_calls(self, index: int) -> bool:
        return self._made_calls[index]


def _chat_deltas(events: list[ToolEvent]) -> list[ChatDelta]:
    """Events as deltas: a call's start on its own (name, arguments ""), runs of content or of one call's
    arguments joined into one delta each."""
    out: list[ChatDelta] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, ContentDelta):
            if last is not None and last.content is not None:
                last.content += event.text
            elif event.text:
                out.append(ChatDelta(content=event.text))
        elif isinstance(event, CallStart):
            out.append(ChatDelta(tool_calls=[DeltaToolCall(
                index=event.index, id=event.id, type="function",
                function=DeltaFunctionCall(name=event.name, arguments=""))]))
        elif isinstance(event, ArgumentsDelta) and event.text:
            if last is not None and last.tool_calls and last.tool_calls[0].index == event.index \
                    and last.tool_calls[0].id is None:
                last.tool_calls[0].function.arguments += event.text  # type: ignore[operator]
            else:
                out.append(ChatDelta(tool_calls=[DeltaToolCall(index=event.index,
                                                                function=DeltaFunctionCall(arguments=event.text))]))
    return out
