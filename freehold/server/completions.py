"""POST /v1/completions: one engine request per prompt (each with n completions), merged into one response.

Choice i*n + j is completion j of prompt i, as in OpenAI's API. `echo` and `prompt_logprobs`: freehold.server.echo;
`best_of`: best_of samples per prompt (one engine request with n = best_of), the n with the highest mean token
logprob returned, best first.
"""
from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from freehold.config import KVPolicy
from freehold.engine.async_engine import EngineDeadError
from freehold.errors import FreeholdError
from freehold.server.errors import error_body, freehold_error_body
from freehold.server.echo import PromptEcho, check_echo_size, prompt_echo
from freehold.server.logprobs import completion_logprobs, joined
from freehold.server.params import (check_num_choices, check_supported, completion_prompts, log_metadata,
                                    request_kv_policy, sampling_params)
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
    fingerprint: str
    echo: PromptEcho
    text_offsets: dict[int, int] = field(default_factory=dict)  # choice index -> characters streamed so far


@router.post("/completions", response_model=Completion, include_in_schema=False)  # base URL without /v1
@router.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES,
             summary="Create a text completion (set stream for server-sent events)")
async def create_completion(body: CompletionRequest, request: Request, response: Response) -> Response | Completion:
    serving: Serving = request.app.state.serving
    headers = serving.check_fields(body)
    model = serving.check_model(body.model)
    check_supported(body)
    log_metadata(body)
    prompts = completion_prompts(body)
    check_num_choices(len(prompts), body.best_of or body.n)
    constraint = await serving.compile_constraint(requested_constraint(body))
    prompt_ids = await serving.encode_prompts(prompts, generated=0 if body.max_tokens == 0 else 1,
                                              sink=request_kv_policy(body, serving.kv_policy) is KVPolicy.SINK)
    check_echo_size(body, prompt_ids)
    params: list[SamplingParams] = []
    for ids in prompt_ids:
        params.append(sampling_params(body, len(ids), serving.max_model_len, constraint, serving.kv_policy))
        serving.check_request(ids, params[-1])
    serving.admit(len(prompt_ids))
    n = params[0].n  # samples per prompt: best_of when given
    echo = await serving.on_tokenizer_threads(lambda: prompt_echo(body, prompts, prompt_ids, serving.tokenizer))
    head = _Head(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, body.logprobs is not None,
                 serving.fingerprint, echo)
    tally = UsageTally()
    runs = [serving.run(f"{head.id}-{i}" if len(prompt_ids) > 1 else head.id, ids, p, tally, index_offset=i * n)
            for i, (ids, p) in enumerate(zip(prompt_ids, params))]
    deltas = merge(runs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(_events(serving, head, deltas, tally, include_usage), headers)
    response.headers.update(headers)
    choices = await until_disconnected(request, serving.collect(deltas, n * len(prompt_ids)))
    choices = _best_of(choices, n, body.n or 1)
    return Completion(id=head.id, created=head.created, model=head.model, system_fingerprint=head.fingerprint,
                      choices=[_choice(serving, head, c) for c in choices], usage=tally.to_usage())


def _best_of(choices: list[Choice], best_of: int, n: int) -> list[Choice]:
    """Of each prompt's best_of samples, the n with the highest mean token logprob, best first, as choices i*n + j."""
    if best_of == n:
        return choices
    out: list[Choice] = []
    for start in range(0, len(choices), best_of):
        ranked = sorted(choices[start:start + best_of], key=_mean_logprob, reverse=True)[:n]
        for j, c in enumerate(ranked):
            c.index = start // best_of * n + j
        out += ranked
    return out


def _mean_logprob(c: Choice) -> float:
    return sum(lp.logprob for lp in c.logprobs) / len(c.logprobs) if c.logprobs else 0.0


def _choice(serving: Serving, head: _Head, c: Choice) -> CompletionChoice:
    prefix, prompt_logprobs = head.echo.prefix(c.index, c.prompt_logprobs, serving.token_text)
    logprobs = None
    if head.logprobs:
        logprobs = completion_logprobs(c.logprobs, serving.token_text, len(prefix))
        if prompt_logprobs is not None:
            logprobs = joined(prompt_logprobs, logprobs)
    reason = c.finish_reason.value if c.finish_reason else None
    return CompletionChoice(index=c.index, text=prefix + c.text, logprobs=logprobs, finish_reason=reason,
                            prompt_logprobs=head.echo.vllm_field(c.prompt_logprobs, serving.token_text))


async def _events(serving: Serving, head: _Head, deltas: AsyncIterator[list[ChoiceDelta]], tally: UsageTally,
                  include_usage: bool) -> AsyncIterator[str]:
    try:
        async with aclosing(deltas):  # type: ignore[type-var]
            async for step in deltas:
                for d in step:
                    yield sse(_chunk(head, _chunk_choice(serving, head, d), include_usage=include_usage))
    except (EngineDeadError, FreeholdError) as exc:
        yield sse(_stream_error(exc))
        yield DONE
        return
    if include_usage:
        yield sse(_chunk(head, None, tally.to_usage(), include_usage=True))
    yield DONE


def _chunk_choice(serving: Serving, head: _Head, d: ChoiceDelta) -> CompletionChoice:
    """One step of one choice; a choice's first chunk starts with its echoed prompt (text and logprobs)."""
    prefix, prompt_logprobs = "", None
    if d.index not in head.text_offsets:
        prefix, prompt_logprobs = head.echo.prefix(d.index, d.prompt_logprobs, serving.token_text)
        head.text_offsets[d.index] = len(prefix)
    logprobs: CompletionLogprobs | None = None
    if head.logprobs:
        logprobs = completion_logprobs(d.logprobs, serving.token_text, head.text_offsets[d.index])
        if prompt_logprobs is not None:
            logprobs = joined(prompt_logprobs, logprobs)
    head.text_offsets[d.index] += len(d.text)
    reason = d.finish_reason.value if d.finish_reason else None
    choice = CompletionChoice(index=d.index, text=prefix + d.text, logprobs=logprobs, finish_reason=reason)
    vllm = head.echo.vllm_field(d.prompt_logprobs, serving.token_text)
    if vllm is not None:  # set only here: sse() leaves unset fields out of a chunk
        choice.prompt_logprobs = vllm
    return choice


def _chunk(head: _Head, choice: CompletionChoice | None, usage: Usage | None = None,
           include_usage: bool = False) -> Completion:
    """With include_usage, `usage` is on every chunk, null but on the last (OpenAI's shape)."""
    chunk = Completion(id=head.id, object="text_completion", created=head.created, model=head.model,
                       system_fingerprint=head.fingerprint, choices=[choice] if choice else [])
    if include_usage or usage is not None:
        chunk.usage = usage
    return chunk


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, FreeholdError):
        return freehold_error_body(exc, "prompt")[1]
    return error_body(500, f"generation failed: {exc}")
