"""Messages with tools -> messages a chat template takes.

A template that handles tools (its source uses `tools`: Qwen2/2.5/3, Llama 3.1+ style) gets the tools through its
`tools` variable (`template_tools`) and the history in the shape transformers gives templates: assistant
`tool_calls` with `arguments` as a mapping, `tool` messages with `tool_call_id` and the called `name`.

Any other template (the default SmolLM2 ChatML one ignores `tools`) gets the fallback, all in plain messages:
the tool list and the call syntax appended to the system message (one is added if there is none), earlier calls as
`<tool_call>` blocks in the assistant's content, and each run of tool results as one user message of
`<tool_response>...</tool_response>` blocks. With tool_choice "none" the tools are not shown at all.

The output syntax is the same for every model (freehold.tools.parse): the grammar enforces it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from freehold.errors import InvalidRequestError
from freehold.tools.parse import CLOSE, OPEN, format_call
from freehold.tools.spec import ToolChoiceMode, ToolRequest

if TYPE_CHECKING:
    from freehold.tokenizer import Tokenizer

FALLBACK_INTRO = "You can call functions. The functions you may call, one JSON object per line:"
FALLBACK_SYNTAX = (f'To call a function, write one block per call, exactly like this:\n{OPEN}{{"name": '
                   f'"<function name>", "arguments": <the arguments as a JSON object>}}{CLOSE}')


def template_handles_tools(tokenizer: Tokenizer) -> bool:
    """True if the tokenizer's chat template reads the `tools` variable (so it renders the tools itself)."""
    return "tools" in (tokenizer.chat_template or "")


def template_tools(request: ToolRequest | None) -> list[dict] | None:
    """The `tools` variable for a template that handles tools (None: no tools shown)."""
    if request is None or request.mode is ToolChoiceMode.NONE:
        return None
    return [tool.as_openai() for tool in request.tools]


def tool_messages(messages: Sequence[Mapping[str, Any]], request: ToolRequest | None,
                  template_handles_tools: bool) -> list[dict]:
    """The messages to render. InvalidRequestError (param "messages[i]...") for a tool message whose tool_call_id
    matches no earlier call, or a call in the history whose arguments are not a JSON object."""
    names: dict[str, str] = {}  # call id -> function name, for the calls seen so far
    out: list[dict] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role == "assistant" and message.get("tool_calls"):
            calls = [_history_call(call, f"messages[{i}].tool_calls[{j}]")
                     for j, call in enumerate(message["tool_calls"])]
            names.update((call_id, name) for call_id, name, _ in calls)
            out.append(_assistant(message, calls, template_handles_tools))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in names:
                raise InvalidRequestError(f"messages[{i}] is a tool result for the call {call_id!r}, which no "
                                          "earlier assistant message made", param=f"messages[{i}].tool_call_id")
            result = _result(names[call_id], call_id, _text(message.get("content")), template_handles_tools)
            if not template_handles_tools and i > 0 and messages[i - 1].get("role") == "tool":
                out[-1]["content"] += "\n" + result["content"]  # a run of results is one user turn
            else:
                out.append(result)
        else:
            out.append(dict(message) if isinstance(message, Mapping) else message)  # the template says what is wrong
    if not template_handles_tools and request is not None and request.mode is not ToolChoiceMode.NONE:
        _add_tool_list(out, request)
    return out


def replayable_arguments(arguments: str) -> str:
    """A call's arguments as a history can render them: the text itself if it is a JSON object whose strings
    are valid Unicode, else "{}" (a call cut off mid-arguments or otherwise malformed; the tool message after it says
    what was wrong). For histories the server or the agent loop stored, not for what a client sends."""
    try:
        value = json.loads(arguments)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a "\ud800" escape decodes to a lone surrogate
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeEncodeError are ValueErrors
        return "{}"
    return arguments if isinstance(value, dict) else "{}"


def fallback_system_text(request: ToolRequest) -> str:
    """What the fallback adds to the system message."""
    lines = [FALLBACK_INTRO, "<tools>"]
    lines += [json.dumps(tool.as_openai(), ensure_ascii=False) for tool in request.tools]
    lines += ["</tools>", "", FALLBACK_SYNTAX]
    if request.mode is ToolChoiceMode.REQUIRED:
        lines.append("You must call at least one function.")
    elif request.mode is ToolChoiceMode.FUNCTION:
        lines.append(f"You must call the function {request.function}.")
    if request.max_calls == 1:
        lines.append("Make at most one call.")
    return "\n".join(lines)


def _history_call(call: Any, param: str) -> tuple[str, str, dict]:
    """(id, name, arguments) of one call in an assistant message."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(f"{param} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                  "\"arguments\"}}}}", param=param)
    arguments = function.get("arguments")
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{param}.function.arguments is not valid JSON: {exc}",
                                  param=f"{param}.function.arguments") from None
    except RecursionError:  # deep nesting ([[[[...) passes the parser's recursion limit
        raise InvalidRequestError(f"{param}.function.arguments nests too deeply to parse",
                                  param=f"{param}.function.arguments") from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param}.function.arguments must be a JSON object in a string",
                                  param=f"{param}.function.arguments")
    for field, text in (("name", function["name"]), ("arguments", json.dumps(value, ensure_ascii=False))):
        try:  # a lone surrogate (sent raw or as a \ud800 escape) is not text: it cannot be rendered or tokenized
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(f"{param}.function.{field} holds an unpaired UTF-16 surrogate, which is not "
                                      "text", param=f"{param}.function.{field}") from None
    return str(call.get("id") or ""), function["name"], value


def _assistant(message: Mapping[str, Any], calls: list[tuple[str, str, dict]], native: bool) -> dict:
    content = _text(message.get("content"))
    if native:
        return {"role": "assistant", "content": content,
                "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
                               for call_id, name, args in calls]}
    blocks = [format_call(name, json.dumps(args, ensure_ascii=False)) for _, name, args in calls]
    return {"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)}


def _result(name: str, call_id: str, content: str, native: bool) -> dict:
    if native:
        return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}
    return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}


def _add_tool_list(out: list[dict], request: ToolRequest) -> None:
    text = fallback_system_text(request)
    if out and out[0].get("role") in ("system", "developer"):
        base = _text(out[0].get("content"))
        out[0] = {**out[0], "content": f"{base}\n\n{text}" if base else text}
    else:
        out.insert(0, {"role": "system", "content": text})


def _text(content: Any) -> str:
    """A message's content as text: a string, null, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    raise InvalidRequestError("a message's content must be a string or a list of text parts", param="messages")
