"""POST /v1/responses: OpenAI's Responses API, run by the agent loop (freehold.agent) on the server's own engine
(`EngineModel`). The request becomes chat messages and tools; the loop's events become the response's output items
(`freehold.server.responses_output`), returned whole or streamed as typed server-sent events.

    instructions, input items                      -> chat messages (freehold.server.responses_input)
    tools: {"type": "function", ...}               -> client tools: their calls end the response as function_call items
    tools: {"type": "file_search", ...}            -> run by the server, as many rounds as the run's limits allow

A response runs within the loop's limits (`_limits`): at most MAX_STEPS model turns (each server-side tool round is
one), `max_tool_calls` server-side calls (default 16), 300 s of wall clock, 30 s per tool call; the same call asked
a third time stops it (loop_detected). `max_output_tokens` bounds the output tokens over all turns (each turn gets
what is left); without it a turn may use the rest of the context, as on chat completions. `store` (default true),
`previous_response_id` and `conversation` keep and continue responses (freehold.server.response_store). A string
bound for the model that is not valid Unicode (a lone surrogate from a \\uD800 escape) is a 400 naming it, as on
chat completions.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import aclosing
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.responses import Response

from freehold.agent import Agent, FunctionTool, Limits, client_tool
from freehold.agent.builtin.file_search import file_search_tool
from freehold.agent.events import Event, RunFinished
from freehold.constrain.spec import JsonObject, JsonSchema
from freehold.errors import InvalidRequestError, NotFoundError, PromptTooLongError
from freehold.server.compat import ignored_fields_headers, pop_unknown_fields
from freehold.server.engine_model import EngineModel
from freehold.server.errors import APIError
from freehold.server.protocol import ErrorResponse
from freehold.server.responses_output import ResponseOutput, SearchRecorder, sse_event
from freehold.server.response_context import (TEMPLATE_SLACK, ContextPlan, plan_context, requested_budget,
                                              summary_max_tokens, write_summary)
from freehold.server.response_store import TurnState, TurnStream, finish_turn, open_turn
from freehold.server.responses_input import (check_unicode, input_messages, stored_items, stored_parts,
                                             typed_parts)
from freehold.server.responses_protocol import (REFUSED_FIELDS, ConversationRef, FileSearchToolParam,
                                                FunctionToolParam, ResponseObject, ResponsesRequest, TypedParts)
from freehold.server.serving import Serving
from freehold.server.streaming import until_disconnected
from freehold.server.structured import RequestedConstraint
from freehold.tools.parse import ContentDelta
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
    if body.input is None:
        raise InvalidRequestError("'input' is required: a string or a list of input items", param="input")
    parts = typed_parts([] if isinstance(body.input, str) else body.input, body.tools)
    headers = ignored_fields_headers(pop_unknown_fields(body, serving.strict_api)
                                     + pop_unknown_fields(parts, serving.strict_api))
    model_name = serving.check_model(body.model)
    _check_supported(body)
    requested_budget(body, serving.max_model_len)  # a bad truncation or budget is a 400 before any lookup
    if body.metadata:
        log.info("request metadata: %s", json.dumps(body.metadata, ensure_ascii=False)[:2000])
    input_messages(body.instructions, body.input, parts)  # the request's own items checked before any lookup
    turn = await open_turn(serving, body, stored_items(body.input, parts))
    try:
        return await _respond(serving, body, request, response, headers, model_name, parts, turn)
    except BaseException:
        turn.release()
        raise


async def _respond(serving: Serving, body: ResponsesRequest, request: Request, response: Response,
                   headers: dict[str, str], model_name: str, parts: TypedParts,
                   turn: TurnState) -> Response | ResponseObject:
    """The response, run within `turn` (whose conversation lock is released when the response is over)."""
    response_id = f"resp_{uuid.uuid4().hex}"
    recorder = SearchRecorder(serving.retrieval.stores) if serving.retrieval is not None else None
    tools = await _tools(serving, parts, recorder)
    context = await _context(serving, body, parts, turn, response_id, [t.as_openai() for t in tools])
    messages = context.messages if context is not None else await _all_messages(serving, body, parts, turn)
    model = EngineModel(serving, model_name, response_id, _sampling(body), _structured(body))
    agent = Agent(model, tools, limits=_limits(body, serving.max_model_len),
                  tool_choice=_tool_choice(body.tool_choice, tools),
                  parallel_tool_calls=body.parallel_tool_calls is not False)
    await _first_turn_checks(model, agent, messages, has_history=bool(turn.history), assembled=context is not None)
    serving.admit(1)
    output = ResponseOutput(_head(body, response_id, model_name, turn), agent, recorder,
                            include_results=INCLUDE_RESULTS in (body.include or []))
    output.context = context.report if context is not None else None
    events = agent.events(messages)
    finish = partial(_finish, serving, turn, context, model_name)
    if body.stream:
        return TurnStream(_stream(output, events, finish), headers, lambda: turn.release())
    response.headers.update(headers)
    try:
        return await until_disconnected(request, _collect(output, events, finish))
    finally:
        turn.release()


async def _all_messages(serving: Serving, body: ResponsesRequest, parts: TypedParts,
                        turn: TurnState) -> list[dict[str, Any]]:
    """Every stored item the response continues, then its input (stored items typed off the event loop: up to
    StoreLimits of JSON)."""
    if not turn.history or serving.conversations is None:
        return input_messages(body.instructions, body.input, parts)
    history = await serving.conversations.run(stored_parts, turn.history)
    return input_messages(body.instructions, body.input, parts, history=history)


async def _context(serving: Serving, body: ResponsesRequest, parts: TypedParts, turn: TurnState,
                   response_id: str, tools: list[dict[str, Any]]) -> ContextPlan | None:
    """The prompt assembled under the request's budget (truncation "auto" or freehold.context), `tools` counted in
    it, or None: then it holds every stored item it continues. Needs the store (--data-dir) for memories and the
    context state."""
    budget = requested_budget(body, serving.max_model_len)
    conversations = serving.conversations
    if budget is None or conversations is None:
        return None
    count = conversations.indexes.counter(lambda text: serving.tokenizer.encode(text, add_special_tokens=False))
    read_key = turn.conversation_id or turn.previous_response_id
    write_key = turn.conversation_id or (response_id if turn.store else None)
    return await conversations.run(plan_context, conversations.memories, conversations.indexes, count, body, parts,
                                   turn.history, turn.input_items, budget, read_key, write_key, tools)


async def _finish(serving: Serving, turn: TurnState, context: ContextPlan | None, model_name: str,
                  response: ResponseObject) -> None:
    """Commit the turn; then, with the memory policy, update the running summary in the background (at most one
    per conversation or chain, none while the server closes: `SummaryTasks`)."""
    await finish_turn(serving, turn, response)
    conversations = serving.conversations
    if context is None or conversations is None or context.state_key is None or context.report.policy != "memory":
        return
    count = conversations.indexes.counter(lambda text: serving.tokenizer.encode(text, add_special_tokens=False))
    max_tokens = summary_max_tokens(context.budget, count)
    if max_tokens == 0:
        return

    async def generate(messages: list[dict[str, Any]], max_tokens: int) -> str:
        model = EngineModel(serving, model_name, f"{response.id}-summary", SamplingParams(temperature=0.0))
        parts = [e.text async for e in model.turn(messages, [], max_tokens=max_tokens, tool_choice="none")
                 if isinstance(e, ContentDelta)]
        return "".join(parts)
    max_prompt = min(context.budget.budget_tokens, serving.max_model_len - max_tokens) - TEMPLATE_SLACK
    conversations.indexes.summaries.start(
        context.state_key, partial(write_summary, conversations.memories, context, generate, count, max_prompt),
        closing=lambda: serving.closing)


# ---- the run --------------------------------------------------------------------------------------------------------
Finish = Callable[[ResponseObject], Awaitable[None]]


async def _collect(output: ResponseOutput, events: AsyncIterator[Event], finish: Finish) -> ResponseObject:
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            output.on(event)
    await finish(output.response)
    return output.response


async def _stream(output: ResponseOutput, events: AsyncIterator[Event], finish: Finish) -> AsyncIterator[str]:
    """response.created and response.in_progress at once, then the run's events as they come; closing this
    generator (the client left) closes the run, which aborts the engine request of the turn in flight. A finished
    run is stored (`finish`) before its last events are sent."""
    for event in output.start():
        yield sse_event(event)
    try:
        async with aclosing(events):  # type: ignore[type-var]
            async for event in events:
                outs = output.on(event)
                if isinstance(event, RunFinished):
                    await finish(output.response)
                for out in outs:
                    yield sse_event(out)
    except Exception as exc:  # a bug, not bad input: the stream still ends with response.failed
        log.exception("response %s failed", output.response.id, exc_info=exc)
        for out in output.fail(f"internal server error: {type(exc).__name__}"):
            yield sse_event(out)


async def _first_turn_checks(model: EngineModel, agent: Agent, messages: list[dict[str, Any]],
                             has_history: bool, assembled: bool) -> None:
    """The first turn prepared now, as the loop will ask for it, so that what would fail it is a 400 (named as the
    Responses API names it) before anything streams."""
    limits = agent.limits
    max_tokens = min(limits.max_turn_tokens, limits.max_output_tokens or limits.max_turn_tokens)
    try:
        await model.prepare(messages, [t.as_openai() for t in agent.tools.values()], max_tokens=max_tokens,
                            tool_choice=agent.tool_choice, parallel_tool_calls=agent.parallel_tool_calls)
    except PromptTooLongError as exc:
        stored = " (assembled under the context budget, which counts the messages' text and tools, not the chat " \
            "template's own tokens: lower freehold.context.budget_tokens or max_output_tokens)" if assembled else \
            " (the stored items it continues included; nothing is dropped to fit without truncation 'auto')" \
            if has_history else ""
        raise APIError(400, f"{exc}{stored}", param="input", code="context_length_exceeded") from None
    except InvalidRequestError as exc:
        param = (exc.param or "").replace(".function.", ".")
        raise InvalidRequestError(str(exc).replace(".function.", "."), param=param or None) from None


# ---- the request ----------------------------------------------------------------------------------------------------
def _check_supported(body: ResponsesRequest) -> None:
    for name in REFUSED_FIELDS:
        if not _neutral(getattr(body, name)):
            raise InvalidRequestError(f"'{name}' is not supported by Freehold", param=name)
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


def _check_unicode(body: ResponsesRequest) -> None:
    """Every string of the request that reaches the template, the tokenizer or the grammar compiler is valid
    Unicode (`check_unicode`)."""
    fmt = body.text.format if body.text is not None else None
    context = body.freehold.context if body.freehold is not None else None
    check_unicode([("instructions", body.instructions), ("input", body.input), ("tools", body.tools),
                   ("text.format.schema", fmt.schema_ if fmt else None),
                   ("previous_response_id", body.previous_response_id), ("conversation", body.conversation),
                   ("freehold.context.namespace", context.namespace if context is not None else None)])


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


def _head(body: ResponsesRequest, response_id: str, model: str, turn: TurnState) -> ResponseObject:
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
                          metadata=body.metadata or {}, user=body.user, service_tier=body.service_tier,
                          store=turn.store, previous_response_id=turn.previous_response_id,
                          truncation="auto" if body.truncation == "auto" else "disabled",
                          conversation=ConversationRef(id=turn.conversation_id) if turn.conversation_id else None)
