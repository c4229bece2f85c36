"""Typed objects that cross the engine boundary: what a request asks for and what a step produces."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from freehold.config import KVPolicy
from freehold.constrain.spec import Constraint
from freehold.errors import FreeholdError, InvalidRequestError

MAX_LOGPROBS = 20
# l / r or l * r stays a finite fp32 number for any logit a model produces: r = 1e-300 (0 in fp32) made NaN
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the client went away or the request was cancelled


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling controls. Order of operations (as vLLM):
    logit_bias -> penalties (repetition, presence, frequency) -> grammar mask (`constraint`) -> temperature -> top-k
    -> top-p -> min-p -> draw."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: chosen token plus top-k alternatives
    # with logprobs: also the same k under this request's sampling settings (TokenLogprob.processed)
    processed_logprobs: bool = False
    n: int = 1
    # speculative decoding for this request: None = the engine's setting, 0 = off, k = at most k draft tokens per
    # step (k may not exceed the engine's --num-speculative-tokens; Engine.check_request says why)
    num_speculative_tokens: int | None = None
    # what the sequence keeps in the KV cache: None = the engine's kv_policy; "sink" = attention sinks + a sliding
    # window (freehold.kv.sink): max_tokens may then run past the context length, evicted tokens are gone
    kv_policy: KVPolicy | None = None
    constraint: Constraint | None = None  # structured output: a compiled grammar the text must match
    # None: off; k: each prompt token's logprob (given the tokens before it) plus the top-k alternatives, reported
    # once on the request's output after its prefill (RequestOutput.prompt_logprobs); allows max_tokens 0
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        min_max_tokens = 0 if self.prompt_logprobs is not None else 1  # 0: prefill only, for prompt logprobs
        _check(self.max_tokens >= min_max_tokens, "max_tokens",
               f"max_tokens must be >= 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        _check(0.0 <= self.temperature <= 2.0, "temperature", f"temperature must be in [0, 2], got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k is None or self.top_k >= 1, "top_k", f"top_k must be >= 1 (or -1 for all), got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY, "repetition_penalty",
               f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}], "
               f"got {self.repetition_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
               f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
               f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        _check(not self.processed_logprobs or self.logprobs is not None, "processed_logprobs",
               "processed_logprobs requires logprobs")
        _check(1 <= self.n <= 16, "n", f"n must be in [1, 16], got {self.n}")
        _check(self.num_speculative_tokens is None or self.num_speculative_tokens >= 0, "num_speculative_tokens",
               f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        _check(self.kv_policy is None or isinstance(self.kv_policy, KVPolicy), "kv_policy",
               f"kv_policy must be one of {', '.join(p.value for p in KVPolicy)}, got {self.kv_policy!r}")
        _check(self.seed is None or -(2**63) <= self.seed < 2**63, "seed",
               f"seed must be a 64-bit signed integer, got {self.seed}")
        _check(self.constraint is None or self.min_tokens == 0, "min_tokens",
               "min_tokens cannot be combined with a structured output constraint: the grammar decides where "
               "the output ends")
        for tok, bias in self.logit_bias.items():
            _check(-100.0 <= bias <= 100.0, "logit_bias", f"logit_bias for token {tok} must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


class ProcessedLogprobs(NamedTuple):
    """A token's logprob and the top alternatives in the distribution it was drawn from (after penalties, masks,
    temperature, top-k, top-p, min-p: freehold.sampling.logprobs.processed_logprobs)."""

    logprob: float  # the chosen token's
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first; tokens with probability 0 left out


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first
    rank: int | None = None  # 1 + the number of tokens more likely than token_id (vLLM's rank); None: not computed
    processed: ProcessedLogprobs | None = None  # SamplingParams.processed_logprobs; None: not asked for


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has several)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What the engine reports for a request after a step: the new tokens of each completion."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    error: FreeholdError | None = None  # the request failed on its own input and was ended (its last output)
    # SamplingParams.prompt_logprobs: one entry per prompt token (None for the first, which has no context), set on
    # exactly one output, the first after the prompt's prefill; None on every other output
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or all(o.finished for o in self.outputs)
