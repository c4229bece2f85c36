"""A Responses API request's input items: typed (a bad one is a 400 naming it, `input[2].call_id`), checked for valid
Unicode, turned into the chat messages the model sees, and normalized into the items Freehold stores.

    instructions                                   -> a system message first
    stored items (previous_response_id, conversation) -> their messages, as below, before the request's input
    input "text"                                   -> a user message
    {"role", "content": str | text parts}          -> that message ("developer" is "system"); "type": "message" or none
    {"type": "function_call", call_id, name, ...}  -> an assistant message with tool_calls (consecutive ones merged)
    {"type": "function_call_output", call_id, ...} -> a tool message (its call_id must match an earlier call)
    {"type": "file_search_call", ...}              -> dropped (an earlier server-side search; its answer follows)

Stored calls are replayed leniently: a function_call cut off by max_output_tokens (its arguments partial JSON) or
with arguments that do not decode to valid Unicode is replayed with arguments "{}", as is any call whose status is
"incomplete" (a client sending back an incomplete response's output), and a stored function_call_output whose call
was deleted from the conversation is left out.

Stored, an item has an `id` (the one sent, or a new one: msg_, fc_, fco_, fs_) and a message's content is a list of
parts (a string becomes one input_text part, output_text for the assistant), as the Conversations API shows them.
The Conversations API's items (`POST /v1/conversations/{id}/items`) go through the same checks, named `items[i]`.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import pydantic

from freehold.errors import InvalidRequestError
from freehold.memory.items import message_item, new_id
from freehold.server.errors import describe_validation_errors
from freehold.server.responses_protocol import (ContentPart, FileSearchCallItem, FunctionCallItem,
                                                FunctionCallOutputItem, InputItem, MessageItem, TypedParts)
from freehold.tools.prompt import replayable_arguments

_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "file_search_call": "fs"}


def typed_parts(items: list[Any], tools: list[Any] | None = None, name: str = "input") -> TypedParts:
    """The items and tools as typed models; a bad one is a 400 naming it as `name[i]...`."""
    try:
        return TypedParts.model_validate({"input": items, "tools": tools or []})
    except pydantic.ValidationError as exc:
        errors = [{**e, "loc": _renamed(_without_tags(e["loc"]), name)} for e in exc.errors()]
        message, param = describe_validation_errors(errors)
        raise InvalidRequestError(message, param=param) from None


def stored_parts(items: Sequence[dict[str, Any]]) -> list[InputItem]:
    """Items read back from the store (checked when they were stored) as typed models."""
    return typed_parts(list(items), name="stored item").input


def _without_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic names the union member after an item's index (input, 0, function_call, call_id): drop it."""
    out = list(loc)
    if len(out) > 2 and isinstance(out[1], int) and isinstance(out[2], str):
        del out[2]
    return tuple(out)


def _renamed(loc: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    return (name, *loc[1:]) if loc and loc[0] == "input" else loc


def input_messages(instructions: str | None, given: str | list[dict[str, Any]] | None, parts: TypedParts,
                   history: Sequence[InputItem] = (), name: str = "input") -> list[dict[str, Any]]:
    """The chat messages of the request (see the module docstring); `history` holds the stored items it continues."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    calls: set[str] = set()
    for item in history:
        messages = _add_item(messages, item, f"stored item {item.id}", calls, stored=True)
    if isinstance(given, str):
        return messages + [{"role": "user", "content": given}]
    if not parts.input:
        raise InvalidRequestError(f"{name} must hold at least one item", param=name)
    for i, item in enumerate(parts.input):
        messages = _add_item(messages, item, f"{name}[{i}]", calls)
    return messages


def _add_item(messages: list[dict[str, Any]], item: InputItem, where: str, calls: set[str],
              stored: bool = False) -> list[dict[str, Any]]:
    if isinstance(item, MessageItem):
        role = "system" if item.role == "developer" else item.role
        messages.append({"role": role, "content": _text(item.content, f"{where}.content")})
    elif isinstance(item, FunctionCallItem):
        messages = _with_call(messages, item, where, lenient=stored or item.status == "incomplete")
        calls.add(item.call_id)
    elif isinstance(item, FunctionCallOutputItem):
        if item.call_id not in calls and stored:
            return messages  # its call was deleted from the conversation
        if item.call_id not in calls:
            raise InvalidRequestError(f"{where} is the output of the call {item.call_id!r}, which no earlier "
                                      "function_call item made", param=f"{where}.call_id")
        messages.append({"role": "tool", "tool_call_id": item.call_id,
                         "content": _text(item.output, f"{where}.output")})
    elif not isinstance(item, FileSearchCallItem):
        raise InvalidRequestError(f"{where}: input items of type {item.type!r} are not supported (only messages, "
                                  "function_call, function_call_output and file_search_call)", param=f"{where}.type")
    return messages


def _with_call(messages: list[dict[str, Any]], item: FunctionCallItem, where: str,
               lenient: bool = False) -> list[dict[str, Any]]:
    """The call appended to the assistant message just before it, if that one makes calls, else to a new one.
    `lenient`: arguments that are not a JSON object (a call cut off mid-arguments) are replayed as "{}"."""
    text = replayable_arguments(item.arguments) if lenient else item.arguments
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{where}.arguments is not valid JSON: {exc}", param=f"{where}.arguments") from None
    except RecursionError:
        raise InvalidRequestError(f"{where}.arguments nests too deeply to parse", param=f"{where}.arguments") from None
    if not isinstance(arguments, dict):
        raise InvalidRequestError(f"{where}.arguments must be a JSON object in a string", param=f"{where}.arguments")
    # escapes in the JSON text (\ud800) decode to what the template renders: a lone surrogate cannot be tokenized
    checked(json.dumps(arguments, ensure_ascii=False), f"{where}.arguments", f"{where}.arguments (decoded)")
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": text}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and "tool_calls" in last:
        last["tool_calls"].append(call)
    elif last is not None and last["role"] == "assistant" and last["content"]:
        last["tool_calls"] = [call]  # the text the same turn wrote before its calls
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return messages


def _text(content: str | list[ContentPart], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in ("input_text", "output_text") or part.text is None:
            raise InvalidRequestError(f"{where}[{j}]: content of type {part.type!r} is not supported: only text "
                                      "(input_text, output_text)", param=f"{where}[{j}]")
        texts.append(part.text)
    return "".join(texts)


def stored_items(given: str | list[dict[str, Any]], parts: TypedParts) -> list[dict[str, Any]]:
    """The request's input as the items to store (see the module docstring)."""
    if isinstance(given, str):
        return [message_item("user", given)]
    out = []
    for item in parts.input:
        value = item.model_dump(mode="json", exclude_none=True, by_alias=True)
        kind = value.setdefault("type", "message")
        value.setdefault("id", new_id(_ID_PREFIX.get(kind, "item")))
        if kind == "message":
            value.setdefault("status", "completed")
            if isinstance(value["content"], str):
                value["content"] = message_item(value["role"], value["content"])["content"]
        out.append(value)
    return out


def check_new_ids(items: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]], name: str = "input") -> None:
    """Each of `items` (as stored) has an id that neither `history` (the stored items they follow) nor an earlier
    one of them has: a 400 naming `name[i].id`."""
    stored = {item["id"] for item in history}
    seen: set[str] = set()
    for i, item in enumerate(items):
        item_id = item["id"]
        if item_id in stored:
            reason = "an item the response continues already has it: send only new items, the earlier ones are " \
                "stored" if name == "input" else "the conversation already holds an item with it"
        elif item_id in seen:
            reason = f"an earlier item of {name} has it"
        else:
            seen.add(item_id)
            continue
        raise InvalidRequestError(f"{name}[{i}].id {item_id!r} is a duplicate: {reason}", param=f"{name}[{i}].id")


def check_unicode(fields: list[tuple[str, Any]]) -> None:
    """Every string of `(param, value)` pairs (keys too, nested) is valid Unicode: JSON's \\uXXXX escapes can
    smuggle lone surrogates, which cannot be tokenized. Walked with a stack, not recursion: a body may nest as deep
    as the JSON parser allowed."""
    stack = list(reversed(fields))
    while stack:
        param, value = stack.pop()
        if isinstance(value, str):
            checked(value, param)
        elif isinstance(value, list):
            stack.extend((f"{param}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, v in reversed(value.items()):
                checked(key, param, f"a key of {param}")  # checked before it joins a param: errors stay text
                stack.append((f"{param}.{key}", v))


def checked(text: str, param: str, what: str | None = None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{what or param} contains an unpaired surrogate (\\u{ord(text[exc.start]):04x}) "
                                  f"at character {exc.start}: not valid Unicode text", param=param) from None
