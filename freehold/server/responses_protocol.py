"""OpenAI's Responses API as pydantic models: the request body, its input items and tools (typed per item, so that
an error names `input[2].call_id`), the response object with its output items, and the streamed events.

Like the chat request models (`freehold.server.protocol`), request models allow unknown fields, which
`freehold.server.compat` collects; fields OpenAI documents are declared, whether Freehold implements them, accepts
them without effect, or refuses them (`freehold.server.responses` says which).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extras: see freehold.server.compat


# ---- the request --------------------------------------------------------------------------------------------------
class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="json_schema: the schema to match")
    description: str | None = None
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: str | None = Field(None, description="not supported: 400 if set")


class ContextParam(_Body):
    """Freehold extension (`freehold.context`): how a turn's context is assembled from what it continues
    (freehold.memory.context)."""

    policy: Literal["memory", "truncate"] | None = Field(None, description="memory (default): summary + recalled "
                                                         "passages + recent turns; truncate: the newest turns that fit")
    budget_tokens: int | None = Field(None, description="prompt tokens to assemble within (default: the context "
                                                        "length less max_output_tokens, or half the context)")
    namespace: str | None = Field(None, description="recall this namespace's /v1/memories too (default: the "
                                  "namespace 'default', where /v1/memories puts a memory given none; a label, not "
                                  "access control)")


class FreeholdParam(_Body):
    """Freehold extension of the request (`freehold`)."""

    context: ContextParam | None = None


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]] | None = Field(None, description="a user message, or a list of input items")
    instructions: str | None = Field(None, description="a system message before the input")
    tools: list[dict[str, Any]] | None = Field(None, description="`function` tools (the client runs them) and "
                                                                 "`file_search` (the server runs it)")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, description="output tokens over every turn of the response")
    max_tool_calls: int | None = Field(None, description="server-side tool calls over the response")
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, description="Freehold extension: the sampling seed")
    stream: bool | None = None
    stream_options: dict[str, Any] | None = Field(None, description="accepted (include_obfuscation: no effect)")
    include: list[str] | None = Field(None, description="only \"file_search_call.results\"")
    text: TextConfig | None = None
    truncation: str | None = Field(None, description="\"disabled\" (default) or \"auto\": drop the oldest turns "
                                                      "to fit (with freehold.context: that policy)")
    metadata: dict[str, str] | None = Field(None, description="accepted and written to the server log")
    user: str | None = Field(None, description="accepted; recorded nowhere")
    safety_identifier: str | None = Field(None, description="accepted; recorded nowhere")
    store: bool | None = Field(None, description="keep the response (default: true on a server with a data "
                                                 "directory): GET /v1/responses/{id}, previous_response_id")
    service_tier: str | None = Field(None, description="accepted; every request is served alike")
    prompt_cache_key: str | None = Field(None, description="accepted; the prefix cache needs no key")
    prompt_cache_retention: str | None = Field(None, description="accepted; no effect")
    previous_response_id: str | None = Field(None, description="continue a stored response: its input and output "
                                                               "items come before this input")
    conversation: Any = Field(None, description="\"conv_...\" or {\"id\": ...}: the conversation's items come "
                                                "before this input; the turn is appended to it")
    # documented, refused unless neutral (null, false, empty)
    reasoning: dict[str, Any] | None = Field(None, description="not supported: 400 unless null or empty")
    background: bool | None = Field(None, description="not supported: 400 if true")
    prompt: Any = Field(None, description="not supported: no stored prompts")
    top_logprobs: int | None = Field(None, description="not supported: 400 unless null or 0")
    context_management: Any = Field(None, description="not supported")
    freehold: FreeholdParam | None = Field(None, description="Freehold extension: context assembly and memories")


REFUSED_FIELDS = ("reasoning", "background", "prompt", "top_logprobs", "context_management")


class ContentPart(_Body):
    """A part of an input message's content: only text parts (`input_text`, or `output_text` in history)."""

    type: str
    text: str | None = None
    annotations: list[Any] | None = None  # output_text history: accepted, not shown to the model
    logprobs: list[Any] | None = None
    image_url: Any = None  # image and file parts are refused by type
    file_id: Any = None
    file_data: Any = None
    file_url: Any = None
    filename: Any = None
    detail: Any = None


class MessageItem(_Body):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None  # an earlier output item sent back: accepted
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FileSearchCallItem(_Body):
    """An earlier server-side search sent back: accepted; the message item after it holds what it found."""

    type: Literal["file_search_call"]
    id: str | None = None
    queries: list[str] | None = None
    status: str | None = None
    results: list[Any] | None = None


class OtherItem(_Body):
    type: str  # any other item type: refused, naming it


def _item_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None or kind == "message":
        return "message"
    return kind if kind in ("function_call", "function_call_output", "file_search_call") else "other"


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[FileSearchCallItem, Tag("file_search_call")] | Annotated[OtherItem, Tag("other")],
                      Discriminator(_item_kind)]


class FunctionToolParam(_Body):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="accepted; a finished call's arguments always match the schema")


class FileSearchToolParam(_Body):
    type: Literal["file_search"]
    vector_store_ids: list[str]
    max_num_results: int | None = Field(None, description="1-50, default 5")
    filters: Any = Field(None, description="not supported yet: 400 if set")
    ranking_options: Any = Field(None, description="not supported yet: 400 if set")


class OtherToolParam(_Body):
    type: str  # web_search, computer_use, mcp, code_interpreter, ...: refused, naming it


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("function", "file_search") else "other"


ToolParam = Annotated[Annotated[FunctionToolParam, Tag("function")]
                      | Annotated[FileSearchToolParam, Tag("file_search")] | Annotated[OtherToolParam, Tag("other")],
                      Discriminator(_tool_kind)]


class TypedParts(_Body):
    """The request's items and tools as typed models (named as in the request, for compat's field paths)."""

    input: list[InputItem]
    tools: list[ToolParam]


# ---- the response -------------------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOutput(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class FileSearchResult(BaseModel):
    file_id: str | None = None
    filename: str | None = None
    score: float | None = None
    text: str | None = None
    attributes: dict[str, Any] | None = None


class FileSearchCallOutput(BaseModel):
    type: Literal["file_search_call"] = "file_search_call"
    id: str
    status: Literal["in_progress", "searching", "completed", "incomplete", "failed"]
    queries: list[str]
    results: list[FileSearchResult] | None = None


OutputItem = Annotated[OutputMessage | FunctionCallOutput | FileSearchCallOutput, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]  # OpenAI's reason for a token cut; other stops name theirs in `freehold`


class IncludedItem(BaseModel):
    id: str
    num_tokens: int


class RecalledPassage(BaseModel):
    source_id: str = Field(description="the conversation item (msg_...) or memory (mem_...) it comes from")
    num_tokens: int
    text: str


class ContextReport(BaseModel):
    """Freehold extension (`response.freehold.context`): what the assembled prompt holds, as the budget counts it
    (freehold.memory.context); set when the request asked for truncation "auto" or `freehold.context`."""

    policy: Literal["memory", "truncate"]
    budget_tokens: int
    num_tokens: int = Field(description="the assembled prompt's tokens as counted against the budget")
    items: list[IncludedItem] = Field(description="stored items included verbatim, oldest first")
    recalled: list[RecalledPassage] = Field(description="passages in the memory block, best first")
    summary_tokens: int = Field(description="the running summary's tokens (0: none included)")
    summary_through: str | None = Field(None, description="the last item the included summary covers")
    num_dropped_items: int = Field(description="stored items left out of the verbatim window")
    parts: dict[str, int] = Field(description="tokens of instructions, tools, summary, recent, recalled, input")


class RunInfo(BaseModel):
    """Freehold extension (`response.freehold`): how the agent loop's run ended, once it has."""

    stop_reason: str = Field(description="answer, client_tools, budget, max_steps, loop_detected, timeout or error")
    detail: str = Field(description="why, in words (\"max_tool_calls (2) reached\", ...)")
    context: ContextReport | None = Field(None, description="what the prompt held (truncation auto or "
                                                            "freehold.context only)")


class ConversationRef(BaseModel):
    id: str


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled", "auto"] = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    service_tier: str | None = None
    store: bool = False
    background: bool = False
    previous_response_id: str | None = None
    conversation: ConversationRef | None = None
    reasoning: dict[str, Any] | None = None
    freehold: RunInfo | None = Field(None, description="Freehold extension: how the run ended (null until then)")


# ---- streamed events ----------------------------------------------------------------------------------------------
class ResponseEvent(BaseModel):
    """Every event: its type and its place in the stream."""

    type: str
    sequence_number: int = 0


class ResponseLifecycleEvent(ResponseEvent):  # response.created / in_progress / completed / incomplete / failed
    response: ResponseObject


class OutputItemEvent(ResponseEvent):  # response.output_item.added / done
    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseEvent):  # response.content_part.added / done
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextDeltaEvent(ResponseEvent):  # response.output_text.delta
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(ResponseEvent):  # response.output_text.done
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDeltaEvent(ResponseEvent):  # response.function_call_arguments.delta
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(ResponseEvent):  # response.function_call_arguments.done
    item_id: str
    output_index: int
    arguments: str


class ItemStatusEvent(ResponseEvent):  # response.file_search_call.in_progress / searching / completed
    item_id: str
    output_index: int
