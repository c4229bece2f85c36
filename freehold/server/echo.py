"""Completions' `echo` and vLLM's `prompt_logprobs` on a choice. Echo puts the prompt's text before the generated
text and, with `logprobs`, the prompt's tokens before the generated ones (the engine's prompt logprobs: the same
rule and numbers as generated tokens get); `prompt_logprobs` adds vLLM's per-choice field. Choice i*n + j of the
response belongs to prompt i."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from freehold.errors import InvalidRequestError
from freehold.server.logprobs import TokenText, echo_logprobs, vllm_prompt_logprobs
from freehold.server.protocol import CompletionLogprobs, CompletionRequest, PromptLogprobs
from freehold.tokenizer import Tokenizer
from freehold.types import TokenLogprob


@dataclass(frozen=True)
class PromptEcho:
    echo: bool
    logprobs: int | None  # the client's `logprobs`: top-k of each echoed token
    prompt_logprobs: int | None  # the client's vLLM `prompt_logprobs`
    n: int  # choices per prompt in the response
    texts: tuple[str, ...]  # each prompt as echoed: its text, or its token ids decoded
    prompt_ids: tuple[tuple[int, ...], ...]

    def prefix(self, index: int, prompt_logprobs: Sequence[TokenLogprob | None] | None,
               token_text: TokenText) -> tuple[str, CompletionLogprobs | None]:
        """Choice `index`'s echoed text and, with logprobs, its prompt tokens' logprobs ("" and None without echo)."""
        if not self.echo:
            return "", None
        prompt = index // self.n
        logprobs = None
        if self.logprobs is not None and prompt_logprobs is not None:
            logprobs = echo_logprobs(self.prompt_ids[prompt], prompt_logprobs, self.logprobs, token_text)
        return self.texts[prompt], logprobs

    def vllm_field(self, prompt_logprobs: Sequence[TokenLogprob | None] | None,
                   token_text: TokenText) -> PromptLogprobs | None:
        if self.prompt_logprobs is None or prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(prompt_logprobs, self.prompt_logprobs, token_text)


# Echoed prompt logprobs repeat in every returned choice, each with its top-k alternatives: a small request (4 long
# prompts, n=16, top 20) would build a response of hundreds of MB on the event loop. This bounds the entries
# (tokens x (1 + top-k), over all choices) one response may carry: about 10 MB of JSON.
MAX_ECHOED_ENTRIES = 200_000


def check_echo_size(request: CompletionRequest, prompt_ids: Sequence[list[int]]) -> None:
    """InvalidRequestError (naming logprobs or prompt_logprobs) if the prompts' logprobs would exceed the bound."""
    per_token = {"logprobs": request.logprobs + 1 if request.echo and request.logprobs is not None else 0,
                 "prompt_logprobs": 0 if request.prompt_logprobs is None else request.prompt_logprobs + 1}
    entries = sum(map(len, prompt_ids)) * (request.n or 1) * sum(per_token.values())
    if entries > MAX_ECHOED_ENTRIES:
        param = max(per_token, key=per_token.__getitem__)
        raise InvalidRequestError(
            f"the prompts' logprobs would fill {entries:,} entries (prompt tokens x choices x (1 + top-k)); at most "
            f"{MAX_ECHOED_ENTRIES:,} per response: send fewer or shorter prompts, a smaller n or fewer top "
            "logprobs", param=param)


def prompt_echo(request: CompletionRequest, prompts: Sequence[str | list[int]], prompt_ids: Sequence[list[int]],
                tokenizer: Tokenizer) -> PromptEcho:
    """Call off the event loop when request.echo is set (token-id prompts are decoded)."""
    echo = bool(request.echo)
    texts = tuple((p if isinstance(p, str) else tokenizer.decode(p)) if echo else "" for p in prompts)
    return PromptEcho(echo, request.logprobs, request.prompt_logprobs, request.n or 1, texts,
                      tuple(tuple(ids) for ids in prompt_ids))
