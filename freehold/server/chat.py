"""POST /v1/chat/completions: messages -> chat template -> one engine request with n completions; with `tools`,
the output is constrained to text and well-formed calls and parsed into tool calls (`freehold.server.tool_calls`)."""
from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from freehold.config import KVPolicy
from freehold.engine.async_engine import EngineDeadError
from freehold.errors import FreeholdError
from freehold.server.errors import error_body, freehold_error_body
from freehold.server.logprobs import chat_logprobs, vllm_prompt_logprobs
from freehold.server.params import (chat_messages, check_supported, log_metadata, request_kv_policy, sampling_params,
                                     template_options)
from freehold.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                      ChatCompletionRequest, ChatDelta, ErrorResponse, PromptLogprobs, Usage)
from freehold.server.serving import Choice, ChoiceDelta, Serving, UsageTally
from freehold.server.structured import requested_constraint
from freehold.server.streaming import DONE, EventStreamResponse, sse, until_disconnected
from freehold.server.tool_calls import (StreamedToolCalls, finish_reason, parses_calls, prompt_messages,
                                        request_constraint, requested_tools, response_message, template_tools)

router = APIRouter()

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 503)}


@dataclass(frozen=True)
class _Head:
    id: str
    created: int
    model: str
    fingerprint: str
    service_tier: str | None  # echoed
    logprobs: bool
    tool_calls: bool  # the output is parsed for tool calls
    include_usage: bool  # streaming: every chunk carries usage (null until the last)


@router.post("/chat/completions", response_model=ChatCompletion, include_in_schema=False)  # base URL without /v1
@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES,
             summary="Create a chat completion (set stream for server-sent events)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 response: Response) -> Response | ChatCompletion:
    serving: Serving = request.app.state.serving
    headers = serving.check_fields(body)
    model = serving.check_model(body.model)
    check_supported(body)
    log_metadata(body)
    tools = requested_tools(body)
    messages = prompt_messages(chat_messages(body), tools, serving.tokenizer)
    constraint = await serving.compile_constraint(request_constraint(tools, requested_constraint(body)))
    sink = request_kv_policy(body, serving.kv_policy) is KVPolicy.SINK  # a chat of any length streams
    prompt_ids = await serving.encode_chat(messages, template_tools(tools, serving.tokenizer),
                                           options=template_options(body), sink=sink)
    params = sampling_params(body, len(prompt_ids), serving.max_model_len, constraint, serving.kv_policy)
    serving.check_request(prompt_ids, params)
    serving.admit(1)
    head = _Head(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, serving.fingerprint, body.service_tier,
                 params.logprobs is not None, parses_calls(tools),
                 bool(body.stream and body.stream_options and body.stream_options.include_usage))
    tally = UsageTally()
    deltas = serving.run(head.id, prompt_ids, params, tally)
    if body.stream:
        return EventStreamResponse(_events(serving, head, deltas, tally, params.n), headers)
    response.headers.update(headers)
    choices = await until_disconnected(request, serving.collect(deltas, params.n))
    return ChatCompletion(id=head.id, created=head.created, model=head.model, system_fingerprint=head.fingerprint,
                          service_tier=head.service_tier, choices=[_choice(serving, head, c) for c in choices],
                          usage=tally.to_usage(), prompt_logprobs=_prompt_logprobs(serving, body, choices))


def _prompt_logprobs(serving: Serving, body: ChatCompletionRequest, choices: list[Choice]) -> PromptLogprobs | None:
    """vLLM's top-level `prompt_logprobs` (the rendered prompt's tokens; not with stream: params.py)."""
    if body.prompt_logprobs is None or choices[0].prompt_logprobs is None:
        return None
    return vllm_prompt_logprobs(choices[0].prompt_logprobs, body.prompt_logprobs, serving.token_text)


def _choice(serving: Serving, head: _Head, c: Choice) -> ChatChoice:
    logprobs = chat_logprobs(c.logprobs, serving.token_text) if head.logprobs else None
    message = response_message(c.text, head.tool_calls)
    return ChatChoice(index=c.index, message=message, logprobs=logprobs,
                      finish_reason=finish_reason(c.finish_reason, bool(message.tool_calls)))


async def _events(serving: Serving, head: _Head, deltas: AsyncIterator[list[ChoiceDelta]], tally: UsageTally,
                  n: int) -> AsyncIterator[str]:
    """The role delta of every choice first (content "", or null when calls may follow), then content and
    tool-call deltas, each choice's finish (a chunk with an empty delta, as OpenAI sends it), usage, [DONE]."""
    for i in range(n):
        yield sse(_chunk(head, ChatChunkChoice(index=i, delta=ChatDelta(role="assistant",
                                                                         content=None if head.tool_calls else ""),
                                               logprobs=None, finish_reason=None)))
    calls = StreamedToolCalls(n) if head.tool_calls else None
    try:
        async with aclosing(deltas):  # type: ignore[type-var]
            async for step in deltas:
                for d in step:
                    for choice in _chunk_choices(serving, head, d, calls):
                        yield sse(_chunk(head, choice))
    except (EngineDeadError, FreeholdError) as exc:
        yield sse(_stream_error(exc))
        yield DONE
        return
    if head.include_usage:
        yield sse(_chunk(head, None, tally.to_usage()))
    yield DONE


def _chunk_choices(serving: Serving, head: _Head, d: ChoiceDelta,
                   calls: StreamedToolCalls | None) -> list[ChatChunkChoice]:
    """One step of one choice as chunks: its deltas, with the step's logprobs on the last one; when the choice ends,
    then a chunk with an empty delta and the finish reason (which also carries the logprobs if the step's text was
    held back, e.g. inside a call's closing tag)."""
    finished = d.finish_reason is not None
    if calls is None:
        deltas = [ChatDelta(content=d.text)] if d.text else []
    else:
        deltas = calls.deltas(d.index, d.text, finished)
    logprobs = chat_logprobs(d.logprobs, serving.token_text) if head.logprobs else None
    if not deltas and not finished and logprobs is None:
        return []
    out = [ChatChunkChoice(index=d.index, delta=delta, logprobs=None, finish_reason=None) for delta in deltas]
    if out:
        out[-1].logprobs = logprobs
    elif not finished:  # text held back: an empty delta carries the step's logprobs
        out.append(ChatChunkChoice(index=d.index, delta=ChatDelta(), logprobs=logprobs, finish_reason=None))
    if finished:
        reason = finish_reason(d.finish_reason, calls is not None and calls.made_calls(d.index))
        out.append(ChatChunkChoice(index=d.index, delta=ChatDelta(), logprobs=None if out else logprobs,
                                   finish_reason=reason))
    return out


def _chunk(head: _Head, choice: ChatChunkChoice | None, usage: Usage | None = None) -> ChatCompletionChunk:
    """A chunk with every field set explicitly (sse() drops unset ones: the delta's absent role/content); with
    include_usage, `usage` is on every chunk, null but on the last (OpenAI's shape)."""
    chunk = ChatCompletionChunk(id=head.id, object="chat.completion.chunk", created=head.created, model=head.model,
                                system_fingerprint=head.fingerprint, choices=[choice] if choice else [])
    if head.service_tier is not None:
        chunk.service_tier = head.service_tier
    if head.include_usage:
        chunk.usage = usage
    return chunk


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, FreeholdError):
        return freehold_error_body(exc, "messages")[1]
    return error_body(500, f"generation failed: {exc}")
