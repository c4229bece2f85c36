"""Completions' `echo` and vLLM's `prompt_logprobs` on a choice. Echo puts the prompt's text before the generated
text and, with `logprobs`, the prompt's tokens before the generated ones (the engine's prompt logprobs: the same
rule and numbers as generated tokens get); `prompt_logprobs` adds vLLM's per-choice field. Choice i*n + j of the
response belongs to prompt i."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def prompt_echo(request: CompletionRequest, prompts: Sequence[str | list[int]], prompt_ids: Sequence[list[int]],
                tokenizer: Tokenizer) -> PromptEcho:
    """Call off the event loop when request.echo is set (token-id prompts are decoded)."""
    echo = bool(request.echo)
    texts = tuple((p if isinstance(p, str) else tokenizer.decode(p)) if echo else "" for p in prompts)
    return PromptEcho(echo, request.logprobs, request.prompt_logprobs, request.n or 1, texts,
                      tuple(tuple(ids) for ids in prompt_ids))
