"""POST /v1/responses: OpenAI's Responses API, run by the agent loop (freehold.agent) on the server's own engine
(`EngineModel`). The request becomes chat messages and tools; the loop's events become the response's output items
(`freehold.server.responses_output`), returned whole or streamed as typed server-sent events.

    instructions                                   -> a system message first
    input "text"                                   -> a user message
    {"role", "content": str | text parts}          -> that message ("developer" is "system"); "type": "message" or none
    {"type": "function_call", call_id, name, ...}  -> an assistant message with tool_calls (consecutive ones merged)
    {"type": "function_call_output", call_id, ...} -> a tool message (its call_id must match an earlier call)
    {"type": "file_search_call", ...}              -> dropped (an earlier server-side search; its answer follows)
    tools: {"type": "function", ...}               -> client tools: their calls end the response as function_call items
    tools: {"type": "file_search", ...}            -> run by the server, as many rounds as the run's limits allow

A response runs within the loop's limits (`_limits`): at most MAX_STEPS model turns (each server-side tool round is
one), `max_tool_calls` server-side calls (default 16), 300 s of wall clock, 30 s per tool call; the same call asked
a third time stops it (loop_detected). `max_output_tokens` bounds the output tokens over all turns (each turn gets
what is left); without it a turn may use the rest of the context, as on chat completions. `store` is accepted and
nothing is stored, so `previous_response_id` is refused (400). A string bound for the model that is not valid
Unicode (a lone surrogate from a \\uD800 escape) is a 400 naming it, as on chat completions.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

import pydantic
from fastapi import APIRouter, Request
from starlette.responses import Response

from freehold.agent import Agent, FunctionTool, Limits, client_tool
from freehold.agent.builtin.file_search import file_search_tool
from freehold.agent.events import Event
from freehold.constrain.spec import JsonObject, JsonSchema
from freehold.errors import InvalidRequestError, NotFoundError, PromptTooLongError
from freehold.server.compat import ignored_fields_headers, pop_unknown_fields
from freehold.server.engine_model import EngineModel
from freehold.server.errors import APIError, describe_validation_errors
from freehold.server.protocol import ErrorResponse
from freehold.server.responses_output import ResponseOutput, SearchRecorder, sse_event
from freehold.server.responses_protocol import (REFUSED_FIELDS, ContentPart, FileSearchCallItem, FileSearchToolParam,
                                                FunctionCallItem, FunctionCallOutputItem, FunctionToolParam,
                                                MessageItem, ResponseObject, ResponsesRequest, TypedParts)
from freehold.server.serving import Serving
from freehold.server.streaming import EventStreamResponse, until_disconnected
from freehold.server.structured import RequestedConstraint
from freehold.tools.spec import NAME_PATTERN
from freehold.types import SamplingParams

router = APIRouter()
log = logging.getLogger("freehold.server")

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 503)}
MAX_STEPS = 8  # model turns of one response: server-side tool rounds plus the answer
INCLUDE_RESULTS = "file_search_call.results"
MAX_SEARCH_RESULTS = 50


@router.post("/responses", response_model=ResponseObject, include_in_schema=False)  # base URL without /v1
@router.post("/v1/responses", response_model=ResponseObject, responses=ERROR_RESPONSES,
             summary="Create a model response (set stream for server-sent events)")
async def create_response(body: ResponsesRequest, request: Request, response: Response) -> Response | ResponseObject:
    serving: Serving = request.app.state.serving
    _check_unicode(body)
    parts = _typed_parts(body)
    headers = ignored_fields_headers(pop_unknown_fields(body, serving.strict_api)
                                     + pop_unknown_fields(parts, serving.strict_api))
    model_name = serving.check_model(body.model)
    _check_supported(body)
    if body.metadata:
        log.info("request metadata: %s", json.dumps(body.metadata, ensure_ascii=False)[:2000])
    messages = input_messages(body.instructions, body.input, parts)
    recorder = SearchRecorder(serving.retrieval.stores) if serving.retrieval is not None else None
    tools = await _tools(serving, parts, recorder)
    response_id = f"resp_{uuid.uuid4().hex}"
    model = EngineModel(serving, model_name, response_id, _sampling(body), _structured(body))
    agent = Agent(model, tools, limits=_limits(body, serving.max_model_len),
                  tool_choice=_tool_choice(body.tool_choice, tools),
                  parallel_tool_calls=body.parallel_tool_calls is not False)
    await _first_turn_checks(model, agent, messages)
    serving.admit(1)
    output = ResponseOutput(_head(body, response_id, model_name), agent, recorder,
                            include_results=INCLUDE_RESULTS in (body.include or []))
    events = agent.events(messages)
    if body.stream:
        return EventStreamResponse(_stream(output, events), headers)
    response.headers.update(headers)
    return await until_disconnected(request, _collect(output, events))


# ---- the run --------------------------------------------------------------------------------------------------------
async def _collect(output: ResponseOutput, events: AsyncIterator[Event]) -> ResponseObject:
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            output.on(event)
    return output.response


async def _stream(output: ResponseOutput, events: AsyncIterator[Event]) -> AsyncIterator[str]:
    """response.created and response.in_progress at once, then the run's events as they come; closing this
    generator (the client left) closes the run, which aborts the engine request of the turn in flight."""
    for event in output.start():
        yield sse_event(event)
    try:
        async with aclosing(events):  # type: ignore[type-var]
            async for event in events:
                for out in output.on(event):
                    yield sse_event(out)
    except Exception as exc:  # a bug, not bad input: the stream still ends with response.failed
        log.exception("response %s failed", output.response.id, exc_info=exc)
        for out in output.fail(f"internal server error: {type(exc).__name__}"):
            yield sse_event(out)


async def _first_turn_checks(model: EngineModel, agent: Agent, messages: list[dict[str, Any]]) -> None:
    """The first turn prepared now, as the loop will ask for it, so that what would fail it is a 400 (named as the
    Responses API names it) before anything streams."""
    limits = agent.limits
    max_tokens = min(limits.max_turn_tokens, limits.max_output_tokens or limits.max_turn_tokens)
    try:
        await model.prepare(messages, [t.as_openai() for t in agent.tools.values()], max_tokens=max_tokens,
                            tool_choice=agent.tool_choice, parallel_tool_calls=agent.parallel_tool_calls)
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param="input", code="context_length_exceeded") from None
    except InvalidRequestError as exc:
        param = (exc.param or "").replace(".function.", ".")
        raise InvalidRequestError(str(exc).replace(".function.", "."), param=param or None) from None


# ---- the request ----------------------------------------------------------------------------------------------------
def _typed_parts(body: ResponsesRequest) -> TypedParts:
    """The input items and tools as typed models; a bad one is a 400 naming it (input[2].call_id)."""
    if body.input is None:
        raise InvalidRequestError("'input' is required: a string or a list of input items", param="input")
    items = [] if isinstance(body.input, str) else body.input
    try:
        return TypedParts.model_validate({"input": items, "tools": body.tools or []})
    except pydantic.ValidationError as exc:
        errors = [{**e, "loc": _without_tags(e["loc"])} for e in exc.errors()]
        message, param = describe_validation_errors(errors)
        raise InvalidRequestError(message, param=param) from None


def _without_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic names the union member after an item's index (input, 0, function_call, call_id): drop it."""
    out = list(loc)
    if len(out) > 2 and isinstance(out[1], int) and isinstance(out[2], str):
        del out[2]
    return tuple(out)


def _check_supported(body: ResponsesRequest) -> None:
    for name in REFUSED_FIELDS:
        if not _neutral(getattr(body, name)):
            reason = " (it needs stored responses, which Freehold does not keep yet)" \
                if name in ("previous_response_id", "conversation") else ""
            raise InvalidRequestError(f"'{name}' is not supported by Freehold{reason}", param=name)
    if body.truncation not in (None, "disabled"):
        raise InvalidRequestError(f"truncation must be 'disabled' (Freehold does not drop input to fit the context), "
                                  f"got {body.truncation!r}", param="truncation")
    if body.text is not None and body.text.verbosity is not None:
        raise InvalidRequestError("'text.verbosity' is not supported by Freehold", param="text.verbosity")
    for i, name in enumerate(body.include or []):
        if name != INCLUDE_RESULTS:
            raise InvalidRequestError(f"include[{i}] {name!r} is not supported: only {INCLUDE_RESULTS!r}",
                                      param=f"include[{i}]")
    for name in ("max_output_tokens", "max_tool_calls"):
        value = getattr(body, name)
        if value is not None and value < 1:
            raise InvalidRequestError(f"{name} must be at least 1, got {value}", param=name)


def _neutral(value: Any) -> bool:
    """A value that asks for nothing: null, false, 0, empty, or an object of such values (`reasoning: {"effort":
    null}`)."""
    if isinstance(value, dict):
        return all(map(_neutral, value.values()))
    return value is None or value is False or value == 0 or value == [] or value == ""


def input_messages(instructions: str | None, given: str | list[dict[str, Any]] | None,
                   parts: TypedParts) -> list[dict[str, Any]]:
    """The chat messages of the request (see the module docstring)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(given, str):
        return messages + [{"role": "user", "content": given}]
    if not parts.input:
        raise InvalidRequestError("input must hold at least one item", param="input")
    calls: set[str] = set()
    for i, item in enumerate(parts.input):
        where = f"input[{i}]"
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content, f"{where}.content")})
        elif isinstance(item, FunctionCallItem):
            messages = _with_call(messages, item, where)
            calls.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in calls:
                raise InvalidRequestError(f"{where} is the output of the call {item.call_id!r}, which no earlier "
                                          "function_call item made", param=f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": _text(item.output, f"{where}.output")})
        elif not isinstance(item, FileSearchCallItem):
            raise InvalidRequestError(f"{where}: input items of type {item.type!r} are not supported (only messages, "
                                      "function_call, function_call_output and file_search_call)",
                                      param=f"{where}.type")
    return messages


def _with_call(messages: list[dict[str, Any]], item: FunctionCallItem, where: str) -> list[dict[str, Any]]:
    """The call appended to the assistant message just before it, if that one makes calls, else to a new one."""
    try:
        arguments = json.loads(item.arguments)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{where}.arguments is not valid JSON: {exc}", param=f"{where}.arguments") from None
    except RecursionError:
        raise InvalidRequestError(f"{where}.arguments nests too deeply to parse", param=f"{where}.arguments") from None
    if not isinstance(arguments, dict):
        raise InvalidRequestError(f"{where}.arguments must be a JSON object in a string", param=f"{where}.arguments")
    # escapes in the JSON text (\ud800) decode to what the template renders: a lone surrogate cannot be tokenized
    _checked(json.dumps(arguments, ensure_ascii=False), f"{where}.arguments", f"{where}.arguments (decoded)")
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
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


def _check_unicode(body: ResponsesRequest) -> None:
    """Every string of the request that reaches the template, the tokenizer or the grammar compiler (keys too) is
    valid Unicode: JSON's \\uXXXX escapes can smuggle lone surrogates, which cannot be tokenized. Walked with a
    stack, not recursion: the body may nest as deep as the JSON parser allowed."""
    fmt = body.text.format if body.text is not None else None
    stack: list[tuple[str, Any]] = [("text.format.schema", fmt.schema_ if fmt else None), ("tools", body.tools),
                                    ("input", body.input), ("instructions", body.instructions)]
    while stack:
        param, value = stack.pop()
        if isinstance(value, str):
            _checked(value, param)
        elif isinstance(value, list):
            stack.extend((f"{param}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, v in reversed(value.items()):
                _checked(key, param, f"a key of {param}")  # checked before it joins a param: errors stay text
                stack.append((f"{param}.{key}", v))


def _checked(text: str, param: str, what: str | None = None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{what or param} contains an unpaired surrogate (\\u{ord(text[exc.start]):04x}) "
                                  f"at character {exc.start}: not valid Unicode text", param=param) from None


async def _tools(serving: Serving, parts: TypedParts, recorder: SearchRecorder | None) -> list[FunctionTool]:
    tools: list[FunctionTool] = []
    for i, tool in enumerate(parts.tools):
        where = f"tools[{i}]"
        if isinstance(tool, FunctionToolParam):
            tools.append(_client_tool(tool, where))
        elif isinstance(tool, FileSearchToolParam):
            tools.append(await _file_search(serving, tool, where, recorder))
        else:
            raise InvalidRequestError(f"{where}: tools of type {tool.type!r} are not supported (only 'function' and "
                                      "'file_search')", param=f"{where}.type")
    names = [t.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidRequestError(f"tools[{i}] repeats the tool name {name!r}: names must be unique "
                                      "('file_search' is the file_search tool's)", param=f"tools[{i}].name")
    return tools


def _client_tool(tool: FunctionToolParam, where: str) -> FunctionTool:
    if not NAME_PATTERN.fullmatch(tool.name):
        raise InvalidRequestError(f"the function name {tool.name!r} must be 1 to 64 letters, digits, '_' or '-'",
                                  param=f"{where}.name")
    parameters = tool.parameters or {"type": "object"}
    if parameters.get("type") != "object":
        raise InvalidRequestError(f"{where}.parameters must be a JSON Schema with \"type\": \"object\"",
                                  param=f"{where}.parameters")
    return client_tool(tool.name, tool.description or "", parameters)


async def _file_search(serving: Serving, tool: FileSearchToolParam, where: str,
                       recorder: SearchRecorder | None) -> FunctionTool:
    retrieval = serving.retrieval
    if retrieval is None or recorder is None:
        raise InvalidRequestError("the file_search tool needs vector stores, which are off on this server (they "
                                  "need an embedding model and the retrieval extra)", param=f"{where}.type")
    for name in ("filters", "ranking_options"):
        if getattr(tool, name) is not None:
            raise InvalidRequestError(f"{where}.{name} is not supported by Freehold yet", param=f"{where}.{name}")
    if not tool.vector_store_ids:
        raise InvalidRequestError(f"{where}.vector_store_ids must name at least one vector store",
                                  param=f"{where}.vector_store_ids")
    max_results = 5 if tool.max_num_results is None else tool.max_num_results
    if not 1 <= max_results <= MAX_SEARCH_RESULTS:
        raise InvalidRequestError(f"{where}.max_num_results must be in [1, {MAX_SEARCH_RESULTS}], got {max_results}",
                                  param=f"{where}.max_num_results")
    for j, store_id in enumerate(tool.vector_store_ids):
        try:
            await retrieval.run(lambda: retrieval.stores.get(store_id))
        except NotFoundError as exc:
            raise NotFoundError(str(exc), param=f"{where}.vector_store_ids[{j}]") from None
    # the recorder stands in for the store manager: it passes searches on and keeps their hits (responses_output)
    return await retrieval.run(lambda: file_search_tool(recorder, tool.vector_store_ids,  # type: ignore[arg-type]
                                                        max_results))


def _tool_choice(choice: str | dict[str, Any] | None, tools: list[FunctionTool]) -> str | dict[str, Any]:
    """The Responses API's tool_choice as chat completions spell it (what the loop passes on)."""
    names = {t.name for t in tools}
    if choice is None or choice in ("auto", "none"):
        return choice or "auto"
    if choice == "required":
        if not tools:
            raise InvalidRequestError("tool_choice is 'required' but no tools are given", param="tool_choice")
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):  # type: ignore[union-attr]
        name = choice["name"]  # type: ignore[index]
        if name not in names:
            raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not among the tools",
                                      param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    if kind == "file_search":
        if "file_search" not in names:
            raise InvalidRequestError("tool_choice asks for file_search, which is not among the tools",
                                      param="tool_choice")
        return {"type": "function", "function": {"name": "file_search"}}
    raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required', {\"type\": \"function\", \"name\": ...}"
                              f" or {{\"type\": \"file_search\"}}, got {json.dumps(choice)[:100]}", param="tool_choice")


def _sampling(body: ResponsesRequest) -> SamplingParams:
    """The request's sampling fields (range errors name them); each turn sets max_tokens."""
    if body.seed is not None and not -(2**63) <= body.seed < 2**63:
        raise InvalidRequestError(f"seed must be a 64-bit signed integer, got {body.seed}", param="seed")
    return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)


def _structured(body: ResponsesRequest) -> RequestedConstraint | None:
    """text.format: json_object or json_schema constrain every turn's text (not with tools: `request_constraint`)."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return RequestedConstraint(JsonObject(), "text.format")
    if fmt.schema_ is None:
        raise InvalidRequestError("text.format of type 'json_schema' needs a 'schema'", param="text.format.schema")
    try:
        return RequestedConstraint(JsonSchema.from_value(fmt.schema_), "text.format.schema")
    except InvalidRequestError as exc:
        raise InvalidRequestError(str(exc), param="text.format.schema") from None


def _limits(body: ResponsesRequest, max_model_len: int) -> Limits:
    return Limits(max_steps=MAX_STEPS, max_tool_calls=body.max_tool_calls or Limits.max_tool_calls,
                  max_output_tokens=body.max_output_tokens,
                  max_turn_tokens=body.max_output_tokens or max_model_len)


def _head(body: ResponsesRequest, response_id: str, model: str) -> ResponseObject:
    """The response before any output: the request's settings echoed."""
    text = {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)} \
        if body.text is not None and body.text.format is not None else {"format": {"type": "text"}}
    return ResponseObject(id=response_id, created_at=int(time.time()), status="in_progress", model=model,
                          instructions=body.instructions, tools=body.tools or [],
                          tool_choice=body.tool_choice or "auto",
                          parallel_tool_calls=body.parallel_tool_calls is not False,
                          max_output_tokens=body.max_output_tokens, max_tool_calls=body.max_tool_calls,
                          temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, text=text,
                          metadata=body.metadata or {}, user=body.user, service_tier=body.service_tier)
