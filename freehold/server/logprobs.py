"""Engine `TokenLogprob`s -> OpenAI's two logprob shapes (chat's `content` list, completions' parallel lists), an
echoed prompt's part of the completions shape, and vLLM's `prompt_logprobs`."""
from __future__ import annotations

from typing import Callable, Sequence

from freehold.server.protocol import (ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprob,
                                      PromptLogprobs, TopLogprob)
from freehold.types import TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf; a masked token (logit_bias -100, min_tokens) reports this instead

TokenText = Callable[[int], str]


def chat_logprobs(logprobs: Sequence[TokenLogprob], token_text: TokenText) -> ChatLogprobs:
    content = []
    for lp in logprobs:
        top = [_top_logprob(t, value, token_text) for t, value in lp.top]
        chosen = _top_logprob(lp.token_id, lp.logprob, token_text)
        entry = ChatTokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes, top_logprobs=top)
        if lp.processed is not None:  # Freehold's processed_logprobs
            entry.processed_logprob = _finite(lp.processed.logprob)
            entry.processed_top_logprobs = [_top_logprob(t, value, token_text) for t, value in lp.processed.top]
        content.append(entry)
    return ChatLogprobs(content=content)


def completion_logprobs(logprobs: Sequence[TokenLogprob], token_text: TokenText,
                        text_offset: int) -> CompletionLogprobs:
    """`text_offset`: characters of this choice's text before the first of these tokens."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for lp in logprobs:
        token = token_text(lp.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(_finite(lp.logprob))
        out.top_logprobs.append({token_text(t): _finite(value) for t, value in lp.top})
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def echo_logprobs(prompt_ids: Sequence[int], prompt_logprobs: Sequence[TokenLogprob | None], k: int,
                  token_text: TokenText) -> CompletionLogprobs:
    """An echoed prompt's tokens in the completions shape: the first has no context, so its logprob and top are
    null (as OpenAI's); the others keep their top-k. text_offset counts from the start of the prompt."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    text_offset = 0
    for token_id, lp in zip(prompt_ids, prompt_logprobs):
        token = token_text(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(None if lp is None else _finite(lp.logprob))
        out.top_logprobs.append(None if lp is None else {token_text(t): _finite(value) for t, value in lp.top[:k]})
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=first.tokens + then.tokens,
                              token_logprobs=first.token_logprobs + then.token_logprobs,
                              top_logprobs=first.top_logprobs + then.top_logprobs,
                              text_offset=first.text_offset + then.text_offset)


def vllm_prompt_logprobs(prompt_logprobs: Sequence[TokenLogprob | None], k: int,
                         token_text: TokenText) -> PromptLogprobs:
    """vLLM's shape: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}} for the prompt
    token and the top-k alternatives (the prompt token first, as vLLM lists it)."""
    out: PromptLogprobs = []
    for lp in prompt_logprobs:
        if lp is None:
            out.append(None)
            continue
        entry = {str(lp.token_id): PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank,
                                                 decoded_token=token_text(lp.token_id))}
        for rank, (t, value) in enumerate(lp.top[:k], start=1):
            entry.setdefault(str(t), PromptLogprob(logprob=_finite(value), rank=rank, decoded_token=token_text(t)))
        out.append(entry)
    return out


def _top_logprob(token_id: int, logprob: float, token_text: TokenText) -> TopLogprob:
    token = token_text(token_id)
    return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(token.encode("utf-8")))


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)
