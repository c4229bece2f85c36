"""OpenAI request fields -> what the engine takes: chat messages, prompts and `SamplingParams`.

Range checks live in `SamplingParams` (its `InvalidRequestError` names the field); this module checks what only
the protocol knows: unsupported fields, field combinations, and the context budget of prompt plus max_tokens.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from freehold.config import KVPolicy
from freehold.constrain.spec import Constraint
from freehold.errors import InvalidRequestError
from freehold.server.errors import APIError
from freehold.server.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields,
                                      unsupported_fields)
from freehold.tokenizer import TemplateOptions
from freehold.types import SamplingParams

MAX_STOP_STRINGS = 16
MAX_CHOICES = 64
_SEED_RANGE = (-(2**63), 2**63 - 1)
_LEGACY_FUNCTIONS = {"functions": "tools", "function_call": "tool_choice"}
log = logging.getLogger("freehold.server")


def check_supported(request: SamplingFields) -> None:
    """400 for any OpenAI field Freehold does not implement, unless it holds a value that asks for nothing."""
    for name in unsupported_fields(type(request)):
        _reject_if_set(name, getattr(request, name), name)
    if isinstance(request, ChatCompletionRequest):
        _reject_legacy_functions(request)
        if request.modalities is not None and set(request.modalities) - {"text"}:
            raise InvalidRequestError("only the 'text' modality is supported", param="modalities")
        for i, message in enumerate(request.messages):
            _check_message(message, f"messages[{i}]")
    if isinstance(request, CompletionRequest):
        _check_legacy_completion_fields(request)
    if request.prompt_logprobs is not None and request.stream and isinstance(request, ChatCompletionRequest):
        raise InvalidRequestError("prompt_logprobs is not supported with stream on chat completions",
                                  param="prompt_logprobs")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")


def _check_legacy_completion_fields(request: CompletionRequest) -> None:
    """`suffix` (insertion) is not implemented; `best_of` samples best_of >= n completions and keeps the n best,
    which needs every sample finished first, so not with stream (as OpenAI)."""
    if request.suffix is not None:
        raise InvalidRequestError("'suffix' is not supported by Freehold (no insertion / fill-in-the-middle)",
                                  param="suffix")
    n = request.n or 1
    if request.best_of is not None and request.best_of < n:
        raise InvalidRequestError(f"best_of must be >= n, got best_of={request.best_of} and n={n}", param="best_of")
    if request.best_of is not None and request.best_of > n and request.stream:
        raise InvalidRequestError("best_of cannot be used with stream", param="best_of")


def log_metadata(request: SamplingFields) -> None:
    """OpenAI's `metadata` (string pairs for the caller's own bookkeeping) goes to the server log, nowhere else."""
    if request.metadata:
        log.info("request metadata: %s", json.dumps(request.metadata, ensure_ascii=False)[:2000])


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as the chat template takes them ("developer" is OpenAI's new name for "system")."""
    if not request.messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    return [_message_dict(m, f"messages[{i}]") for i, m in enumerate(request.messages)]


def template_options(request: ChatCompletionRequest) -> TemplateOptions:
    """How to render the chat: vLLM's add_generation_prompt / continue_final_message / chat_template_kwargs, and
    OpenAI's reasoning_effort as a template variable (templates of reasoning models read it)."""
    variables = dict(request.chat_template_kwargs or {})
    if request.reasoning_effort is not None:
        variables.setdefault("reasoning_effort", request.reasoning_effort)
    add_generation_prompt = request.add_generation_prompt
    if add_generation_prompt is None:  # continuing a message implies no new turn
        add_generation_prompt = not request.continue_final_message
    return TemplateOptions(add_generation_prompt=add_generation_prompt,
                           continue_final_message=bool(request.continue_final_message), variables=variables)


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """The prompt field as a list of prompts, each a string or a list of token ids."""
    prompt = request.prompt
    if isinstance(prompt, str):
        _check_text(prompt, "prompt")
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be an empty list", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    for p in prompt:
        if isinstance(p, str):
            _check_text(p, "prompt")
    return list(prompt)


def check_num_choices(num_prompts: int, n: int | None) -> None:
    """Bound the work one completions request can ask for: prompts x n choices."""
    if num_prompts * (n or 1) > MAX_CHOICES:
        raise InvalidRequestError(f"{num_prompts} prompts x n={n} is more than {MAX_CHOICES} choices in one request",
                                  param="prompt")


def request_kv_policy(request: ChatCompletionRequest | CompletionRequest, default: KVPolicy) -> KVPolicy:
    """The request's KV policy: its own `kv_policy` field, else `default` (the server's --kv-policy)."""
    return KVPolicy(request.kv_policy) if request.kv_policy else default


def sampling_params(request: ChatCompletionRequest | CompletionRequest, num_prompt_tokens: int,
                    max_model_len: int, constraint: Constraint | None = None,
                    default_kv_policy: KVPolicy = KVPolicy.FULL) -> SamplingParams:
    """SamplingParams for one prompt; max_tokens defaults to the rest of the context. Under the KV policy "sink"
    (`request_kv_policy`) the prompt and max_tokens may each exceed the context, and max_tokens defaults to the
    whole context length (`max_model_len`), whatever the prompt's length: a chat longer than the context keeps
    going. `constraint` is the compiled structured-output constraint the request asked for
    (`freehold.server.structured`)."""
    max_tokens, max_tokens_param = _max_tokens(request)
    room = max_model_len - num_prompt_tokens
    sink = request_kv_policy(request, default_kv_policy) is KVPolicy.SINK
    if max_tokens is None:
        # a full-policy prompt that fills the context is rejected by the engine's check
        max_tokens = max_model_len if sink else max(room, 1)
    elif max_tokens > room > 0 and not sink:
        raise APIError(
            400, f"this model's context is {max_model_len} tokens, but {num_prompt_tokens + max_tokens} were "
            f"requested ({num_prompt_tokens} in the prompt, {max_tokens} in {max_tokens_param}); lower "
            f"{max_tokens_param} to at most {room}", param=max_tokens_param, code="context_length_exceeded")
    try:
        return _make_params(request, max_tokens, constraint)
    except InvalidRequestError as exc:  # name the field as this endpoint spells it
        renamed = {"max_tokens": max_tokens_param}
        if isinstance(request, CompletionRequest) and request.best_of is not None:
            renamed["n"] = "best_of"  # the engine draws best_of samples
        if isinstance(request, ChatCompletionRequest):
            renamed["logprobs"] = "top_logprobs"
        raise InvalidRequestError(str(exc), param=renamed.get(exc.param or "", exc.param)) from exc


# ---- private ------------------------------------------------------------------------------------------------------
def _make_params(r: ChatCompletionRequest | CompletionRequest, max_tokens: int,
                 constraint: Constraint | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=_default(r.min_tokens, 0),
        temperature=_default(r.temperature, 1.0),
        top_p=_default(r.top_p, 1.0),
        top_k=None if r.top_k in (None, -1) else r.top_k,
        min_p=_default(r.min_p, 0.0),
        repetition_penalty=_default(r.repetition_penalty, 1.0),
        presence_penalty=_default(r.presence_penalty, 0.0),
        frequency_penalty=_default(r.frequency_penalty, 0.0),
        logit_bias=_logit_bias(r.logit_bias),
        seed=_seed(r.seed),
        stop=_stop(r.stop),
        ignore_eos=bool(r.ignore_eos),
        num_speculative_tokens=r.num_speculative_tokens,
        kv_policy=KVPolicy(r.kv_policy) if r.kv_policy else None,
        logprobs=_logprobs(r),
        processed_logprobs=_processed_logprobs(r),
        n=_num_samples(r),
        prompt_logprobs=_prompt_logprobs(r),
        constraint=constraint,
    )


def _reject_if_set(name: str, value: Any, param: str) -> None:
    neutral = value is None or value is False or value == [] or value == {}
    if not neutral:
        raise InvalidRequestError(f"'{param}' is not supported by Freehold", param=param)


def _reject_legacy_functions(request: ChatCompletionRequest) -> None:
    """OpenAI deprecated `functions` / `function_call` for `tools` / `tool_choice`; they are not mapped."""
    for name, replacement in _LEGACY_FUNCTIONS.items():
        if getattr(request, name) is not None:
            raise InvalidRequestError(f"'{name}' is deprecated and not supported by Freehold: use '{replacement}'",
                                      param=name)


def _message_dict(m: ChatMessage, where: str) -> dict[str, Any]:
    """One message as the chat template takes it: the role ("developer" is OpenAI's new name for "system"),
    the content (None only beside tool calls), and the tool fields where set."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": None}
    if m.content is not None:
        texts = [m.content] if isinstance(m.content, str) else [p.text or "" for p in m.content]
        for text in texts:
            _check_text(text, f"{where}.content")
        out["content"] = m.content if isinstance(m.content, str) else [{"type": "text", "text": t} for t in texts]
    if m.tool_calls is not None:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _check_message(message: ChatMessage, where: str) -> None:
    for name in unsupported_fields(ChatMessage):
        _reject_if_set(name, getattr(message, name), f"{where}.{name}")
    _check_tool_fields(message, where)
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"content part type {part.type!r} is not supported: only {{'type': 'text', 'text': ...}} parts",
                    param=f"{where}.content[{j}]")


def _check_tool_fields(message: ChatMessage, where: str) -> None:
    """tool_calls only on assistant messages, tool_call_id only (and always) on tool messages, and content on
    every message but an assistant one that makes calls."""
    if message.tool_calls is not None and message.role != "assistant":
        raise InvalidRequestError(f"tool_calls is only allowed on assistant messages, not {message.role!r}",
                                  param=f"{where}.tool_calls")
    if message.role == "tool" and message.tool_call_id is None:
        raise InvalidRequestError("a tool message needs the tool_call_id of the call it answers",
                                  param=f"{where}.tool_call_id")
    if message.role != "tool" and message.tool_call_id is not None:
        raise InvalidRequestError(f"tool_call_id is only allowed on tool messages, not {message.role!r}",
                                  param=f"{where}.tool_call_id")
    if message.content is None and not (message.role == "assistant" and message.tool_calls):
        raise InvalidRequestError("content is required (it may be null only on an assistant message with "
                                  "tool_calls)", param=f"{where}.content")


def _max_tokens(request: ChatCompletionRequest | CompletionRequest) -> tuple[int | None, str]:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        digits = key.strip()  # ASCII digits only: str.isdigit() also takes '²', which int() refuses
        if re.fullmatch(r"[0-9]{1,18}", digits) is None:
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {key[:40]!r}", param="logit_bias")
        out[int(digits)] = value
    return out


def _seed(seed: int | None) -> int | None:
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise InvalidRequestError(f"seed must be a 64-bit signed integer, got {seed}", param="seed")
    return seed


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
    for s in stops:
        _check_text(s, "stop")
    return tuple(s for s in stops if s)


def _check_text(text: str, param: str) -> None:
    """JSON's \\uXXXX escapes can smuggle lone surrogates, which are not text and cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{param} contains an unpaired surrogate (\\u{ord(text[exc.start]):04x}) at "
                                  f"character {exc.start}: not valid Unicode text", param=param) from None


def _num_samples(request: ChatCompletionRequest | CompletionRequest) -> int:
    """Completions with best_of: best_of samples, of which the route keeps the n best."""
    if isinstance(request, CompletionRequest) and request.best_of is not None:
        return request.best_of
    return _default(request.n, 1)


def _prompt_logprobs(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    """vLLM's prompt_logprobs; completions' echo with logprobs needs the prompt's too (echo with max_tokens 0 and
    no logprobs runs the prefill alone, which asks for them with k = 0); the engine computes the larger k."""
    if request.prompt_logprobs is not None and request.prompt_logprobs < 0:
        raise InvalidRequestError(f"prompt_logprobs must be >= 0, got {request.prompt_logprobs}",
                                  param="prompt_logprobs")
    wanted = [request.prompt_logprobs]
    if isinstance(request, CompletionRequest) and request.echo:
        wanted.append(request.logprobs if request.logprobs is not None or request.max_tokens != 0 else 0)
    ks = [k for k in wanted if k is not None]
    return max(ks) if ks else None


def _processed_logprobs(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """Freehold's chat extension: the sampled distribution's logprobs too (freehold.sampling.logprobs)."""
    if not isinstance(request, ChatCompletionRequest) or not request.processed_logprobs:
        return False
    if not request.logprobs:
        raise InvalidRequestError("processed_logprobs requires logprobs to be true", param="processed_logprobs")
    return True


def _logprobs(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(request, CompletionRequest):
        if request.logprobs is None and (request.best_of or 1) > (request.n or 1):
            return 0  # best_of ranks the samples by their tokens' mean logprob
        return request.logprobs
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if not request.logprobs:
        return None
    return _default(request.top_logprobs, 0)
