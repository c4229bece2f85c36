"""POST /tokenize and /detokenize (also under /v1): the served model's tokenizer, for clients that count tokens
(chat UIs, context budgeting), in vLLM's request and response shapes.

    {"prompt": "text", "add_special_tokens": true}           -> {"count", "max_model_len", "tokens", "token_strs"}
    {"messages": [...], "add_generation_prompt": true, ...}  -> the same, for the chat prompt
    {"tokens": [ids]}                                        -> {"prompt": "text"}

A prompt is checked and encoded as /v1/completions does it, messages are checked, rendered (chat template, tools)
and encoded as /v1/chat/completions does it (the same functions), so `count` is the `usage.prompt_tokens` those
endpoints report for the same input. The work runs on the tokenizer threads, and a text whose length alone shows it
cannot fit the context is refused before it is tokenized (`PromptLengthBound`), as on those endpoints.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from freehold.errors import InvalidRequestError, PromptTooLongError
from freehold.server.errors import APIError
from freehold.server.params import chat_messages, check_supported, completion_prompts, template_options
from freehold.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ErrorResponse, Tool
from freehold.server.serving import Serving
from freehold.server.tool_calls import prompt_messages, requested_tools, template_tools
from freehold.tokenizer import Tokenizer

router = APIRouter()

ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401)}
_PROMPT_ONLY = ("add_special_tokens",)
_CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools")


class _Request(BaseModel):
    # strict types like freehold.server.protocol; unknown fields are dropped and listed (freehold.server.compat)
    model_config = ConfigDict(extra="allow", strict=True)


class TokenizeRequest(_Request):
    """vLLM's two tokenize requests in one body: `prompt` or `messages`, not both."""

    model: str | None = Field(None, description="one of the served names; absent: the served model")
    prompt: str | None = Field(None, description="a text, encoded as /v1/completions encodes a prompt")
    add_special_tokens: bool | None = Field(None, description="prompt only: add the BOS/EOS the model asks for "
                                                              "(default true)")
    messages: list[ChatMessage] | None = Field(None, description="a chat, rendered and encoded as "
                                                                 "/v1/chat/completions does it")
    add_generation_prompt: bool | None = Field(None, description="messages only: end with the assistant header "
                                                                 "(default true)")
    continue_final_message: bool | None = Field(None, description="messages only: end inside the last message")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="messages only: extra template variables")
    tools: list[Tool] | None = Field(None, description="messages only: the tools, rendered as the chat endpoint "
                                                       "renders them")
    return_token_strs: bool | None = Field(None, description="also return each token's spelling in the vocabulary")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = Field(None, description="one of the served names; absent: the served model")
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/v1/tokenize", response_model=TokenizeResponse, include_in_schema=False)
@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             summary="Token ids of a prompt or a chat, as the completion endpoints would count them")
async def tokenize(body: TokenizeRequest, request: Request, response: Response) -> TokenizeResponse:
    serving: Serving = request.app.state.serving
    response.headers.update(serving.check_fields(body))
    serving.check_model(body.model)
    _check_input(body)
    param = "prompt" if body.prompt is not None else "messages"
    try:
        ids = await (_encode_prompt(serving, body) if body.prompt is not None else _encode_chat(serving, body))
    except PromptTooLongError as exc:  # named after this request's field (the error handler guesses from the path)
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
    token_strs = None
    if body.return_token_strs:
        token_strs = await serving.on_tokenizer_threads(lambda: _spellings(serving.tokenizer, ids))
    return TokenizeResponse(count=len(ids), max_model_len=serving.max_model_len, tokens=ids, token_strs=token_strs)


@router.post("/v1/detokenize", response_model=DetokenizeResponse, include_in_schema=False)
@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             summary="The text of token ids")
async def detokenize(body: DetokenizeRequest, request: Request, response: Response) -> DetokenizeResponse:
    serving: Serving = request.app.state.serving
    response.headers.update(serving.check_fields(body))
    serving.check_model(body.model)
    text = await serving.on_tokenizer_threads(lambda: _decode(serving.tokenizer, body.tokens))
    return DetokenizeResponse(prompt=text)


# ---- private ------------------------------------------------------------------------------------------------------
def _check_input(body: TokenizeRequest) -> None:
    if body.prompt is None and body.messages is None:
        raise InvalidRequestError("send 'prompt' (a text) or 'messages' (a chat)", param="prompt")
    if body.prompt is not None and body.messages is not None:
        raise InvalidRequestError("send 'prompt' or 'messages', not both", param="messages")
    misplaced, other = (_CHAT_ONLY, "messages") if body.prompt is not None else (_PROMPT_ONLY, "prompt")
    for name in misplaced:
        if getattr(body, name) is not None:
            raise InvalidRequestError(f"'{name}' applies only with '{other}'", param=name)


async def _encode_prompt(serving: Serving, body: TokenizeRequest) -> list[int]:
    prompts = completion_prompts(CompletionRequest(prompt=body.prompt))  # the same checks as /v1/completions
    add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
    [ids] = await serving.encode_prompts(prompts, add_special_tokens=add_special_tokens)
    return ids


async def _encode_chat(serving: Serving, body: TokenizeRequest) -> list[int]:
    """The steps of /v1/chat/completions up to its prompt ids (freehold.server.chat), with nothing to generate."""
    chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message,
                                 chat_template_kwargs=body.chat_template_kwargs, tools=body.tools)
    check_supported(chat)
    tools = requested_tools(chat)
    messages = prompt_messages(chat_messages(chat), tools, serving.tokenizer)
    return await serving.encode_chat(messages, template_tools(tools, serving.tokenizer),
                                     options=template_options(chat))


def _spellings(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.id_to_token(i) or "" for i in ids]


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of `ids`; an id outside the vocabulary is a 400 (the tokenizer would decode it as nothing)."""
    vocab_size = tokenizer.vocab_size
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(f"tokens[{i}] = {token_id} is not a token id of this model (0 to "
                                      f"{vocab_size - 1})", param="tokens")
    return tokenizer.decode(ids)
