"""The HTTP layer's side of the engine: tokenization and grammar compiles off the event loop (each on its own
threads, `freehold.server.workers`), admission, shutdown, and each engine request turned into text deltas
(detokenization and stop strings via `TextStream`).

The engine runs on its own thread (`AsyncEngine`); everything here runs on the event loop. A request whose
consumer stops early (client gone) closes its `run` generator, which aborts the engine request and frees its KV.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Sequence, TypeVar

from pydantic import BaseModel

from freehold.constrain.compiler import ConstraintCompiler
from freehold.constrain.spec import Constraint
from freehold.engine.async_engine import AsyncEngine
from freehold.errors import InvalidRequestError
from freehold.server.compat import ignored_fields_headers, pop_unknown_fields
from freehold.server.conversations import Conversations
from freehold.server.embedding_worker import EmbeddingWorker
from freehold.server.errors import APIError, QueueFullError, ServerShuttingDownError
from freehold.server.limits import PromptLengthBound, ServerLimits
from freehold.server.metrics import ServerMetrics
from freehold.server.protocol import PromptTokensDetails, Usage
from freehold.server.structured import RequestedConstraint
from freehold.server.workers import GrammarCompiles
from freehold.text_stream import TextStream, fold_output
from freehold.tokenizer import TemplateOptions, Tokenizer
from freehold.types import CompletionOutput, FinishReason, RequestOutput, SamplingParams, TokenLogprob

if TYPE_CHECKING:  # the retrieval extra is optional
    from freehold.server.ingest import Retrieval

T = TypeVar("T")


@dataclass
class ChoiceDelta:
    """What one step added to one choice of the response."""

    index: int  # choice index in the response: prompt number * n + completion index
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the request's prompt logprobs, on one delta


@dataclass
class Choice:
    """A finished choice (non-streaming responses)."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class UsageTally:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))


class Serving:
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model_names: str | Sequence[str],
                 max_waiting: int | None, limits: ServerLimits | None = None, fingerprint: str = "fh",
                 strict_api: bool = False):
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.model_names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
        self.fingerprint = fingerprint  # system_fingerprint: what was served (version, weights, KV dtype)
        self.strict_api = strict_api  # unknown request fields are 400s instead of ignored (freehold.server.compat)
        self.closing = False  # set when shutdown begins: new requests get 503
        self.tokenizer = tokenizer
        self.model_name = self.model_names[0]
        self.max_model_len = engine.engine.max_model_len
        self.kv_policy = engine.engine.config.kv_policy  # requests without their own kv_policy
        self.max_waiting = max_waiting
        self.num_pending = 0  # requests whose engine request has produced no token yet
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine.stats, lambda: self.num_pending)
        compiler = ConstraintCompiler(tokenizer, engine.engine.model_config.vocab_size,
                                      cache_bytes=self.limits.grammar_cache_bytes)
        self.constraints = GrammarCompiles(compiler, self.limits.grammar_compile_workers,
                                           self.limits.grammar_compile_queue, self.limits.grammar_compile_timeout_s)
        self.prompt_bound = PromptLengthBound(tokenizer)
        self._tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="freehold-tokenize")
        self.embeddings: EmbeddingWorker | None = None  # /v1/embeddings (freehold.server.embeddings), set by main
        self.retrieval: Retrieval | None = None  # files and vector stores (freehold.server.ingest), set by main
        self.conversations: Conversations | None = None  # stored responses and conversations, set by main

    # -- before a request starts ----------------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        """The name to answer with: the requested one if it is served (any alias), the first served name if none
        was given; OpenAI's 404 model_not_found for any other."""
        if model is None:
            return self.model_name
        if model not in self.model_names:
            raise APIError(404, f"the model {model!r} does not exist here; this server serves "
                           f"{', '.join(map(repr, self.model_names))}", param="model", code="model_not_found")
        return model

    def check_fields(self, body: BaseModel) -> dict[str, str]:
        """Drop the request's unknown fields (400 under --strict-api); the response headers that list them."""
        return ignored_fields_headers(pop_unknown_fields(body, self.strict_api))

    async def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                          options: TemplateOptions | None = None, sink: bool = False) -> list[int]:
        """The chat prompt's ids (`tools` for a template that renders them); PromptTooLongError first, without
        tokenizing, if the rendered text cannot fit (the template may trim or drop content, so the bound reads what
        it renders). `sink`: the request's KV policy is "sink", which streams a prompt of any length: no bound."""
        def encode() -> list[int]:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, options=options)
            if not sink:
                self.prompt_bound.check([text], self.max_model_len)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return await self._off_loop(encode)

    async def encode_prompts(self, prompts: Sequence[str | list[int]], add_special_tokens: bool = True,
                             generated: int = 1, sink: bool = False) -> list[list[int]]:
        """Token ids of each prompt; PromptTooLongError first if a text cannot leave `generated` tokens of room
        (0 for a prompt-only request: echo with max_tokens 0), unless `sink` (any length streams)."""
        def encode() -> list[list[int]]:
            for p in prompts:
                if isinstance(p, str) and not sink:
                    self.prompt_bound.check([p], self.max_model_len, generated)
            return [self.tokenizer.encode(p, add_special_tokens) if isinstance(p, str) else list(p) for p in prompts]
        return await self._off_loop(encode)

    async def on_tokenizer_threads(self, fn: Callable[[], T]) -> T:
        """Run other tokenizer work (decoding, token spellings) on the tokenizer threads, off the event loop."""
        return await self._off_loop(fn)

    async def compile_constraint(self, requested: RequestedConstraint | None) -> Constraint | None:
        """Compile a structured-output constraint on the compile pool (a large schema can take seconds, and neither
        the engine thread nor plain requests wait for it); cached specs return at once."""
        if requested is None:
            return None
        try:
            return await self.constraints.compile(requested.spec, requested.param)
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param=requested.param) from None

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The engine's own checks (empty prompt, token ids, context length), before any response starts."""
        self.engine.check_request(prompt_ids, params)

    def admit(self, num_requests: int) -> None:
        """Refuse new work while shutting down, or while `max_waiting` requests still wait for their first token."""
        if self.closing:
            raise ServerShuttingDownError()
        if self.max_waiting is not None and self.num_pending + num_requests > self.max_waiting:
            raise QueueFullError(self.num_pending)

    # -- shutdown -------------------------------------------------------------------------------------------
    def stop_admitting(self) -> None:
        """Shutdown began: new requests get 503; those admitted run on."""
        self.closing = True

    def end_all(self) -> None:
        """The grace period is over: every request still running, or waiting for its grammar, ends with a 503
        (an error event and [DONE] on a stream)."""
        self.closing = True
        self.engine.fail_all(ServerShuttingDownError("the server shut down before this request finished"))
        self.constraints.close()

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- running --------------------------------------------------------------------------------------------
    async def run(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tally: UsageTally,
                  index_offset: int = 0) -> AsyncIterator[list[ChoiceDelta]]:
        """One engine request (params.n completions) as lists of per-choice deltas, until every completion ends."""
        progress = _Progress(request_id, index_offset, [TextStream(self.tokenizer, params.stop)
                                                        for _ in range(params.n)], tally)
        self.num_pending += 1
        tally.prompt_tokens += len(prompt_ids)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        try:
            async with aclosing(self.engine.generate(request_id, prompt_ids, params)) as outputs:
                async for out in outputs:
                    if progress.first_token_at is None:
                        self._on_first_output(progress, out)
                    deltas = [self._absorb(progress, o) for o in out.outputs if o.index not in progress.finished]
                    for d in deltas:  # each choice (completion) of the request shares the prompt
                        d.prompt_logprobs = out.prompt_logprobs
                    deltas = [d for d in deltas if d.text or d.logprobs or d.finish_reason is not None
                              or d.prompt_logprobs is not None]
                    if deltas:
                        yield deltas
                    if len(progress.finished) == params.n:
                        break  # every completion ended (a stop string may end one before the engine reports it)
        finally:
            if progress.first_token_at is None:
                self.num_pending -= 1
            self._record_finish(progress, params.n)

    async def collect(self, deltas: AsyncIterator[list[ChoiceDelta]], num_choices: int) -> list[Choice]:
        choices = [Choice(i) for i in range(num_choices)]
        async with aclosing(deltas):
            async for step in deltas:
                for d in step:
                    choice = choices[d.index]
                    choice.text += d.text
                    choice.logprobs += d.logprobs
                    choice.finish_reason = d.finish_reason or choice.finish_reason
                    choice.prompt_logprobs = d.prompt_logprobs or choice.prompt_logprobs
        return choices

    # -- private --------------------------------------------------------------------------------------------
    async def _off_loop(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn)

    def _on_first_output(self, progress: _Progress, out: RequestOutput) -> None:
        progress.first_token_at = time.perf_counter()
        self.num_pending -= 1
        progress.tally.cached_tokens += out.num_cached_tokens
        self.metrics.time_to_first_token.observe(progress.first_token_at - progress.start)

    def _absorb(self, progress: _Progress, out: CompletionOutput) -> ChoiceDelta:
        """Detokenize one completion's new tokens; a stop string ends that completion in the engine too."""
        self._record_tokens(progress, out)
        text, reason, stopped_early = fold_output(progress.streams[out.index], out)
        if stopped_early:
            self.engine.stop_sequence(progress.request_id, out.index)
        if reason is not None:
            progress.finished[out.index] = reason
        return ChoiceDelta(progress.index_offset + out.index, text, list(out.logprobs or []), reason)

    def _record_tokens(self, progress: _Progress, out: CompletionOutput) -> None:
        if not out.token_ids:
            return
        now = time.perf_counter()
        progress.tally.completion_tokens += len(out.token_ids)
        self.metrics.generation_tokens.inc(len(out.token_ids))
        previous = progress.last_token_at.get(out.index)
        if previous is not None:
            self.metrics.inter_token_latency.observe((now - previous) / len(out.token_ids))
        progress.last_token_at[out.index] = now

    def _record_finish(self, progress: _Progress, n: int) -> None:
        for reason in progress.finished.values():
            self.metrics.requests.labels(reason.value).inc()
        if len(progress.finished) < n:
            self.metrics.requests.labels(FinishReason.ABORT.value).inc(n - len(progress.finished))
        else:
            self.metrics.request_latency.observe(time.perf_counter() - progress.start)


@dataclass
class _Progress:
    """Where one engine request stands in the HTTP layer."""

    request_id: str
    index_offset: int
    streams: list[TextStream]  # one per completion
    tally: UsageTally
    finished: dict[int, FinishReason] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: dict[int, float] = field(default_factory=dict)
