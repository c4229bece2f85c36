"""Engine `TokenLogprob`s -> OpenAI's two logprob shapes (chat's `content` list, completions' parallel lists)."""
from __future__ import annotations

from typing import Callable, Sequence

from freehold.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from freehold.types import TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf; a masked token (logit_bias -100, min_tokens) reports this instead

TokenText = Callable[[int], str]


def chat_logprobs(logprobs: Sequence[TokenLogprob], token_text: TokenText) -> ChatLogprobs:
    content = []
    for lp in logprobs:
        top = [_top_logprob(t, value, token_text) for t, value in lp.top]
        chosen = _top_logprob(lp.token_id, lp.logprob, token_text)
        content.append(ChatTokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes,
                                        top_logprobs=top))
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


def _top_logprob(token_id: int, logprob: float, token_text: TokenText) -> TopLogprob:
    token = token_text(token_id)
    return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(token.encode("utf-8")))


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)
