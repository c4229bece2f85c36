"""The fixed call syntax and reading calls back out of generated text, whole (`parse_tool_calls`) or as it streams
(`ToolCallStream`). One block per call:

    <tool_call>{"name": "NAME", "arguments": {...}}</tool_call>

Reading is syntactic, so streamed and whole reads agree exactly on any text: a block is a call when its opening
matches HEAD (`{"name": "NAME", "arguments": ` with free whitespace, then a character that is neither space nor
'<'); the call's arguments are the block's text after the head, less the call object's closing `}` and the
whitespace around it. A block cut off by the end of the text (max_tokens) keeps all of its text as arguments.
Whether the arguments are valid JSON is the caller's to check: constrained output is, unless max_tokens cut it off.
Text outside calls is content; each stretch of it loses its trailing whitespace (the separators between calls).
A block whose opening does not match HEAD stays in the content, tags included.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*(?=[^\s<])')
_TAIL = re.compile(r"\s*\}?\s*\Z")  # what ends a finished block's arguments: the call object's closing brace
# what may still become that end (or the closing tag) at the end of a block's text so far
_MAYBE_TAIL = re.compile(r"\s*\}?\s*(?:" + "|".join(re.escape(CLOSE[:i]) for i in range(len(CLOSE) - 1, 0, -1))
                         + r")?\Z")


def call_head(name: str) -> str:
    """The text that opens a call of `name` (the grammar's tag begins with it)."""
    return f'{OPEN}{{"name": {json.dumps(name)}, "arguments": '


def format_call(name: str, arguments: str) -> str:
    """One call in the fixed syntax (history turns are rendered with it)."""
    return f"{call_head(name)}{arguments}}}{CLOSE}"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text as generated (compact for constrained output)
    id: str = field(default_factory=new_call_id)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


ToolEvent = ContentDelta | CallStart | ArgumentsDelta


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished text."""
    content: list[str] = []
    calls: list[ToolCall] = []
    stretch, pos = "", 0  # the content since the last call
    while (start := text.find(OPEN, pos)) >= 0:
        end = text.find(CLOSE, start + len(OPEN))
        after = len(text) if end < 0 else end + len(CLOSE)
        block = text[start + len(OPEN):after - (len(CLOSE) if end >= 0 else 0)]
        head = HEAD.match(block)
        if head is None:  # not a call: the block is content
            stretch += text[pos:after]
        else:
            content.append((stretch + text[pos:start]).rstrip())
            stretch, arguments = "", block[head.end():]
            if end >= 0:
                arguments = arguments[:_TAIL.search(arguments).start()]
            calls.append(ToolCall(head.group(1), arguments))
        pos = after
    content.append((stretch + text[pos:]).rstrip())
    return "".join(content), calls


class ToolCallStream:
    """Turns text deltas into content and call events; `push` each delta, then `finish` once. The events add up to
    what `parse_tool_calls` reads from the whole text, for any way of splitting it."""

    def __init__(self) -> None:
        self._buffer = ""  # text not yet turned into events
        self._in_block = False  # inside <tool_call> ... (OPEN already consumed)
        self._call: int | None = None  # the index of the call whose arguments are streaming
        self._num_calls = 0
        self._held_space = ""  # content whitespace kept back: dropped if a call or the end follows

    def push(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        events: list[ToolEvent] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while self._step(events, final=True):
            pass
        self._held_space = ""
        return events

    def _step(self, events: list[ToolEvent], final: bool) -> bool:
        """Consume what can be decided now; True if more may be decidable."""
        if not self._in_block:
            return self._content_step(events, final)
        if self._call is None:
            return self._head_step(events, final)
        return self._arguments_step(events, final)

    def _content_step(self, events: list[ToolEvent], final: bool) -> bool:
        start = self._buffer.find(OPEN)
        if start >= 0:
            self._content(events, self._buffer[:start])
            self._buffer, self._in_block = self._buffer[start + len(OPEN):], True
            return True
        keep = 0 if final else _partial_suffix(self._buffer, OPEN)
        self._content(events, self._buffer[:len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False

    def _head_step(self, events: list[ToolEvent], final: bool) -> bool:
        end = self._buffer.find(CLOSE)
        block = self._buffer if end < 0 else self._buffer[:end]
        head = HEAD.match(block)
        if head is not None:
            self._held_space = ""  # the trailing whitespace of the content before a call is dropped
            self._call, self._num_calls = self._num_calls, self._num_calls + 1
            events.append(CallStart(self._call, new_call_id(), head.group(1)))
            self._buffer = self._buffer[head.end():]
            return True
        if end >= 0 or final:  # not a call: the whole block is content
            after = len(self._buffer) if end < 0 else end + len(CLOSE)
            self._content(events, OPEN + self._buffer[:after])
            self._buffer, self._in_block = self._buffer[after:], False
            return end >= 0
        return False

    def _arguments_step(self, events: list[ToolEvent], final: bool) -> bool:
        end = self._buffer.find(CLOSE)
        if end >= 0:
            arguments = self._buffer[:end]
            self._arguments(events, arguments[:_TAIL.search(arguments).start()])
            self._buffer, self._in_block, self._call = self._buffer[end + len(CLOSE):], False, None
            return True
        keep = 0 if final else len(self._buffer) - _MAYBE_TAIL.search(self._buffer).start()
        self._arguments(events, self._buffer[:len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False

    def _arguments(self, events: list[ToolEvent], text: str) -> None:
        if text:
            events.append(ArgumentsDelta(self._call, text))

    def _content(self, events: list[ToolEvent], text: str) -> None:
        """Emit content, holding back trailing whitespace until more content shows it is not a stretch's end."""
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body):]
        if body:
            events.append(ContentDelta(body))


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
