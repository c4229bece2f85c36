"""POST /v1/completions: one engine request per prompt (each with n completions), merged into one response.

Choice i*n + j is completion j of prompt i, as in OpenAI's API.
"""
from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from freehold.engine.async_engine import EngineDeadError
from freehold.errors import FreeholdError
from freehold.server.errors import error_body, freehold_error_body
from freehold.server.logprobs import completion_logprobs
from freehold.server.params import check_num_choices, check_supported, completion_prompts, sampling_params
from freehold.server.protocol import (Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
                                      ErrorResponse, Usage)
from freehold.server.serving import Choice, ChoiceDelta, Serving, UsageTally
from freehold.server.structured import requested_constraint
from freehold.server.streaming import DONE, EventStreamResponse, merge, sse, until_disconnected
from freehold.types import SamplingParams

router = APIRouter()

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 503)}


@dataclass
class _Head:
    id: str
    created: int
    model: str
    logprobs: bool
    text_offsets: dict[int, int] = field(default_factory=dict)  # choice index -> characters streamed so far


@router.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES,
             summary="Create a text completion (set stream for server-sent events)")
async def create_completion(body: CompletionRequest, request: Request) -> Response | Completion:
    serving: Serving = request.app.state.serving
    serving.check_model(body.model)
    check_supported(body)
    prompts = completion_prompts(body)
    check_num_choices(len(prompts), body.n)
    constraint = await serving.compile_constraint(requested_constraint(body))
    prompt_ids = await serving.encode_prompts(prompts)
    params: list[SamplingParams] = []
    for ids in prompt_ids:
        params.append(sampling_params(body, len(ids), serving.max_model_len, constraint))
        serving.check_request(ids, params[-1])
    serving.admit(len(prompt_ids))
    n = params[0].n
    head = _Head(f"cmpl-{uuid.uuid4().hex}", int(time.time()), serving.model_name, params[0].logprobs is not None)
    tally = UsageTally()
    runs = [serving.run(f"{head.id}-{i}" if len(prompt_ids) > 1 else head.id, ids, p, tally, index_offset=i * n)
            for i, (ids, p) in enumerate(zip(prompt_ids, params))]
    deltas = merge(runs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(_events(serving, head, deltas, tally, include_usage))
    choices = await until_disconnected(request, serving.collect(deltas, n * len(prompt_ids)))
    return Completion(id=head.id, created=head.created, model=head.model,
                      choices=[_choice(serving, head, c) for c in choices], usage=tally.to_usage())


def _choice(serving: Serving, head: _Head, c: Choice) -> CompletionChoice:
    logprobs = completion_logprobs(c.logprobs, serving.token_text, 0) if head.logprobs else None
    reason = c.finish_reason.value if c.finish_reason else None
    return CompletionChoice(index=c.index, text=c.text, logprobs=logprobs, finish_reason=reason)


async def _events(serving: Serving, head: _Head, deltas: AsyncIterator[list[ChoiceDelta]], tally: UsageTally,
                  include_usage: bool) -> AsyncIterator[str]:
    try:
        async with aclosing(deltas):  # type: ignore[type-var]
            async for step in deltas:
                for d in step:
                    yield sse(_chunk(head, _chunk_choice(serving, head, d)))
    except (EngineDeadError, FreeholdError) as exc:
        yield sse(_stream_error(exc))
        yield DONE
        return
    if include_usage:
        yield sse(_chunk(head, None, tally.to_usage()))
    yield DONE


def _chunk_choice(serving: Serving, head: _Head, d: ChoiceDelta) -> CompletionChoice:
    logprobs: CompletionLogprobs | None = None
    if head.logprobs:
        logprobs = completion_logprobs(d.logprobs, serving.token_text, head.text_offsets.get(d.index, 0))
    head.text_offsets[d.index] = head.text_offsets.get(d.index, 0) + len(d.text)
    reason = d.finish_reason.value if d.finish_reason else None
    return CompletionChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=reason)


def _chunk(head: _Head, choice: CompletionChoice | None, usage: Usage | None = None) -> Completion:
    chunk = Completion(id=head.id, object="text_completion", created=head.created, model=head.model,
                       choices=[choice] if choice else [])
    if usage is not None:
        chunk.usage = usage
    return chunk


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, FreeholdError):
        return freehold_error_body(exc, "prompt")[1]
    return error_body(500, f"generation failed: {exc}")
