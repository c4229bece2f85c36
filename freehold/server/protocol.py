"""The OpenAI protocol as pydantic models: request bodies (strict types) and responses.

Request models declare every field Freehold implements, the documented fields it accepts without effect on the
output, and the documented fields it cannot honour (rejected with a 400 unless they hold a neutral value: see
`freehold.server.params.check_supported`). Fields nobody documents are collected, not refused: the request goes on
without them and the response lists them (`freehold.server.compat`), unless the server runs with --strict-api.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

UNSUPPORTED = "Not supported by Freehold: a request that sets it is rejected with a 400."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extras: see freehold.server.compat


_UNSUPPORTED_MARK = "x-freehold-unsupported"


def _unsupported() -> Any:
    return Field(None, description=UNSUPPORTED, json_schema_extra={_UNSUPPORTED_MARK: True})


def unsupported_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The OpenAI fields of `model` that Freehold declares only to reject them."""
    return tuple(name for name, f in model.model_fields.items()
                 if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(_UNSUPPORTED_MARK))


# ---- requests -----------------------------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool | None = None


class ContentPart(_Strict):
    """One part of a message's content. Only `{"type": "text"}` parts are supported."""

    type: str
    text: str | None = None
    image_url: Any = _unsupported()
    input_audio: Any = _unsupported()
    file: Any = _unsupported()


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="the arguments as a JSON object in a string")


class MessageToolCall(_Strict):
    """A call an earlier assistant turn made (history)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, description="may be null only on an assistant message "
                                                                      "with tool_calls")
    tool_calls: list[MessageToolCall] | None = Field(None, description="assistant messages: the calls made")
    tool_call_id: str | None = Field(None, description="tool messages: the id of the call this is the result of")
    name: str | None = Field(None, description="the speaker's name, passed to the chat template")
    function_call: Any = _unsupported()
    refusal: str | None = Field(None, description="an assistant message's refusal text (history): accepted, not shown")
    audio: Any = _unsupported()


class JsonSchemaFormat(_Strict):
    name: str = Field(description="a name for the schema (recorded nowhere)")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON Schema the output must match")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: set exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON Schema (object or string)")
    regex: str | None = None
    grammar: str | None = Field(None, description="EBNF (GBNF) with a `root` rule")
    choice: list[str] | None = None
    json_object: bool | None = None


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of an object; absent: no arguments")
    strict: bool | None = Field(None, description="accepted; a finished call's arguments always match the schema")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class SamplingFields(_Strict):
    """Sampling fields shared by both endpoints (OpenAI's plus vLLM's `top_k`, `min_p`, ... extensions)."""

    model: str | None = Field(None, description="one of the served names (GET /v1/models); absent: the served model")
    temperature: float | None = Field(None, description="0 is greedy; default 1")
    top_p: float | None = None
    top_k: int | None = Field(None, description="-1 or null: all tokens")
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    stop: str | list[str] | None = Field(None, description="matched in the text, across token boundaries")
    n: int | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted for compatibility; recorded nowhere")
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    num_speculative_tokens: int | None = Field(
        None, description="Freehold: this request's speculative decoding: 0 = off, k = at most k draft tokens per "
                          "step (up to the server's --num-speculative-tokens; only on a server started with "
                          "--speculative); absent: the server's setting")
    kv_policy: Literal["full", "sink"] | None = Field(
        None, description="Freehold: what this request keeps in the KV cache: sink = attention sinks + a sliding "
                          "window (--sink-tokens, --window): max_tokens may exceed the context, tokens that leave "
                          "the window are gone; absent: the server's --kv-policy")
    prompt_logprobs: int | None = Field(None, description="vLLM: each prompt token's logprob and the top-k "
                                                          "alternatives, 0-20 (`prompt_logprobs` in the response)")
    # structured outputs: at most one of these (see freehold.server.structured)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM: a JSON Schema the output must match")
    guided_regex: str | None = Field(None, description="vLLM: a regex the whole output must match")
    guided_grammar: str | None = Field(None, description="vLLM: an EBNF (GBNF) grammar with a `root` rule")
    guided_choice: list[str] | None = Field(None, description="vLLM: the output is exactly one of these strings")
    structured_outputs: StructuredOutputs | None = None
    # accepted, with no effect on the output
    service_tier: str | None = Field(None, description="accepted and echoed; every request is served alike")
    store: bool | None = Field(None, description="accepted; Freehold stores no completions")
    metadata: dict[str, str] | None = Field(None, description="accepted and written to the server log")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, description="takes precedence over max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    processed_logprobs: bool | None = Field(
        None, description="Freehold: with logprobs, also each token's logprob and top_logprobs alternatives in the "
                          "distribution it was sampled from (after penalties, grammar, temperature, top-k, top-p, "
                          "min-p), as processed_logprob and processed_top_logprobs")
    tools: list[Tool] | None = Field(None, description="functions the model may call (freehold.tools)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(None, description="default true: any number of calls in one turn")
    functions: Any = Field(None, description="deprecated by OpenAI: rejected with a 400 (use tools)")
    function_call: Any = Field(None, description="deprecated by OpenAI: rejected with a 400 (use tool_choice)")
    # vLLM's chat template controls
    add_generation_prompt: bool | None = Field(None, description="vLLM: end the prompt with the assistant header "
                                                                 "(default true)")
    continue_final_message: bool | None = Field(None, description="vLLM: continue the last message (prefill) instead "
                                                                  "of starting a new one")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM: extra variables for the chat "
                                                                          "template")
    reasoning_effort: str | None = Field(None, description="passed to the chat template as `reasoning_effort` (a "
                                                           "template that does not read it ignores it)")
    prediction: Any = Field(None, description="OpenAI's predicted output: accepted; the output does not depend "
                                              "on it")
    modalities: list[str] | None = Field(None, description="only [\"text\"]")
    # not implemented
    audio: Any = _unsupported()
    web_search_options: Any = _unsupported()


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput = Field(description="a string, a list of strings, a list of token ids, or a list of those")
    max_tokens: int | None = Field(16, description="null: the rest of the context")
    logprobs: int | None = Field(None, description="number of alternatives per token, 0-20")
    echo: bool | None = Field(None, description="prepend the prompt to each choice's text (and its tokens to "
                                                "logprobs); with max_tokens 0, only the prompt is scored")
    best_of: int | None = Field(None, description="generate best_of samples, return the n with the highest mean "
                                                  "token logprob (not with stream)")
    suffix: Any = Field(None, description="not supported: a request that sets it is rejected with a 400")


# ---- responses ----------------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


def _absent(value: Any) -> bool:
    return value is None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    # Freehold, only when the request sets processed_logprobs (left out of the JSON otherwise)
    processed_logprob: float | None = Field(None, exclude_if=_absent)
    processed_top_logprobs: list[TopLogprob] | None = Field(None, exclude_if=_absent)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the turn is only tool calls
    tool_calls: list[ResponseToolCall] | None = None


ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    service_tier: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's: the prompt is shared by every choice


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A call's first delta sets id, type and function.name (arguments ""); later ones append function.arguments."""

    index: int  # the call's position in this choice's tool_calls
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    service_tier: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # null: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's `Logprob`: one entry of a prompt position's {token id: ...} map."""

    logprob: float
    rank: int | None  # 1 = the most likely token
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # one per prompt token, null for the first


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, per choice


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "freehold"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
