"""The agent loop's events (freehold.agent.events) as a Responses API response: output items in the order the model
produced them, and the typed events OpenAI streams for them.

    a turn's text            message item: output_item.added, content_part.added, output_text.delta ... then, at
                             the turn's end, output_text.done, content_part.done, output_item.done
    a call of a client tool  function_call item: output_item.added, function_call_arguments.delta ... .done,
                             output_item.done (the run then ends: the client runs the call)
    a file_search call       file_search_call item: output_item.added, file_search_call.in_progress; .searching
                             when the turn ends (the loop runs it), .completed and output_item.done with its result
    the run's end            response.completed, or response.incomplete (a budget or limit cut it), or
                             response.failed (a later turn could not run: `error` says why)

incomplete_details.reason is only ever OpenAI's "max_output_tokens" (a turn hit its max tokens, or the token budget
left no room for another): the loop's other stops (max_tool_calls, max_steps, loop_detected, timeout) are
"incomplete" with incomplete_details null, and every finished response names its stop in the extension field
`freehold: {"stop_reason", "detail"}`. A file_search call cut off by max_tokens, or one the loop refused to run
(past max_tool_calls or max_repeats), is "incomplete"; one that ran and failed is "failed".

Every event carries a `sequence_number`, increasing from 0; each is serialized when made (later changes to an item
do not reach an event already sent).
"""
from __future__ import annotations

import json
import secrets
import threading
from typing import TYPE_CHECKING, Any

from freehold.agent import Agent, StopReason
from freehold.agent.events import CallDelta, Event, ModelTurn, RunFinished, TextDelta, ToolResult
from freehold.server.responses_protocol import (ArgumentsDeltaEvent, ArgumentsDoneEvent, ContentPartEvent,
                                                ContextReport, FileSearchCallOutput, FileSearchResult,
                                                FunctionCallOutput, IncompleteDetails, InputTokensDetails,
                                                ItemStatusEvent, OutputItem, OutputItemEvent, OutputMessage, OutputText,
                                                ResponseError, ResponseEvent, ResponseLifecycleEvent, ResponseObject,
                                                ResponseUsage, RunInfo, TextDeltaEvent, TextDoneEvent)

if TYPE_CHECKING:  # the retrieval extra is optional
    from freehold.retrieval.manager import StoreManager
    from freehold.retrieval.records import SearchHit, SearchResult, StoreInfo

_NOT_RUN = ("budget", "loop_detected", "not_run")  # ToolResult.error_type of a call the loop refused to run
_LIFECYCLE_EVENT = {"completed": "response.completed", "incomplete": "response.incomplete",
                    "failed": "response.failed"}


def sse_event(event: ResponseEvent) -> str:
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


class SearchRecorder:
    """The vector stores as the file_search tool sees them (`get`, `search`), keeping each query's hits so that
    `include: ["file_search_call.results"]` can return them (the tool gives the model text)."""

    def __init__(self, stores: StoreManager):
        self._stores = stores
        self._hits: dict[str, list[SearchHit]] = {}
        self._limits: dict[str, int] = {}
        self._lock = threading.Lock()  # searches run on the tool's threads

    def get(self, store_id: str) -> StoreInfo:
        return self._stores.get(store_id)

    def search(self, store_id: str, query: str, **options: Any) -> SearchResult:
        result = self._stores.search(store_id, query, **options)
        with self._lock:
            self._hits.setdefault(query, []).extend(result.hits)
            self._limits[query] = options.get("max_num_results", len(result.hits))
        return result

    def results(self, query: str) -> list[FileSearchResult]:
        """The hits the tool showed for `query`: the best across the stores, best first."""
        with self._lock:
            unique = {(hit.file_id, hit.chunk_id): hit for hit in self._hits.get(query, [])}
            limit = self._limits.get(query, 0)
        best = sorted(unique.values(), key=lambda hit: -hit.score)[:limit]
        return [FileSearchResult(file_id=h.file_id, filename=h.filename, score=h.score, text=h.text,
                                 attributes=dict(h.attributes)) for h in best]


class ResponseOutput:
    """One response as its run goes: `start()` then `on(event)` for each loop event give the stream's events;
    `response` is the response object so far (whole once the run has finished)."""

    def __init__(self, head: ResponseObject, agent: Agent, recorder: SearchRecorder | None, include_results: bool):
        self.response = head
        self._client_tools = {name for name, tool in agent.tools.items() if tool.function is None}
        self._max_output_tokens = agent.limits.max_output_tokens
        self._recorder = recorder
        self._include_results = include_results
        self.context: ContextReport | None = None  # what the prompt held, when it was assembled (response_context)
        self._sequence = 0
        self._step = 0
        self._message: int | None = None  # output index of this turn's message item
        self._turn_calls: dict[int, str] = {}  # this turn's call index -> call id
        self._call_items: dict[str, int] = {}  # call id -> output index
        self._open: set[int] = set()  # output items not yet done
        self._last_finish: str | None = None  # finish_reason of the last turn
        self._cut_calls: set[str] = set()  # ids of calls whose arguments max_tokens cut off

    def start(self) -> list[ResponseEvent]:
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def on(self, event: Event) -> list[ResponseEvent]:
        if isinstance(event, (TextDelta, CallDelta, ModelTurn)) and event.step != self._step:
            self._step, self._message, self._turn_calls = event.step, None, {}
        if isinstance(event, TextDelta):
            return self._text(event.text)
        if isinstance(event, CallDelta):
            return self._call_delta(event)
        if isinstance(event, ModelTurn):
            return self._turn_end(event)
        if isinstance(event, ToolResult):
            return self._tool_result(event)
        if isinstance(event, RunFinished):
            return self._finish(event)
        return []

    def fail(self, message: str) -> list[ResponseEvent]:
        """End the response as failed (the run broke off)."""
        out = self._close_open()
        self.response.status, self.response.error = "failed", ResponseError(code="server_error", message=message)
        return out + [self._lifecycle("response.failed")]

    # -- items ----------------------------------------------------------------------------------------------------
    def _text(self, text: str) -> list[ResponseEvent]:
        if not text:
            return []
        out = self._open_message() if self._message is None else []
        item = self._item(self._message)
        assert isinstance(item, OutputMessage)
        item.content[0].text += text
        return out + [self._emit(TextDeltaEvent(type="response.output_text.delta", item_id=item.id,
                                                output_index=self._message, delta=text))]

    def _open_message(self) -> list[ResponseEvent]:
        item = OutputMessage(id=f"msg_{secrets.token_hex(12)}", status="in_progress", content=[])
        out = [self._add(item)]
        self._message = len(self.response.output) - 1
        item.content.append(OutputText(text=""))
        return out + [self._emit(ContentPartEvent(type="response.content_part.added", item_id=item.id,
                                                  output_index=self._message, part=OutputText(text="")))]

    def _call_delta(self, delta: CallDelta) -> list[ResponseEvent]:
        if delta.name is not None and delta.id is not None:
            return self._start_call(delta.index, delta.id, delta.name)
        index = self._call_items[self._turn_calls[delta.index]]
        item = self._item(index)
        if not isinstance(item, FunctionCallOutput) or not delta.arguments:
            return []  # a file search's query is read whole when the turn ends
        item.arguments += delta.arguments
        return [self._emit(ArgumentsDeltaEvent(type="response.function_call_arguments.delta", item_id=item.id,
                                               output_index=index, delta=delta.arguments))]

    def _start_call(self, turn_index: int, call_id: str, name: str) -> list[ResponseEvent]:
        self._turn_calls[turn_index] = call_id
        self._call_items[call_id] = len(self.response.output)
        if name in self._client_tools:
            return [self._add(FunctionCallOutput(id=f"fc_{secrets.token_hex(12)}", call_id=call_id, name=name,
                                                 arguments="", status="in_progress"))]
        item = FileSearchCallOutput(id=f"fs_{secrets.token_hex(12)}", status="in_progress", queries=[])
        return [self._add(item), self._status(item, "response.file_search_call.in_progress")]

    def _turn_end(self, turn: ModelTurn) -> list[ResponseEvent]:
        """Close the turn's message and function calls; its searches are now run by the loop."""
        self._last_finish = turn.finish_reason
        cut = turn.finish_reason == "length"
        out: list[ResponseEvent] = []
        if turn.content and self._message is None:  # a model that does not stream
            out += self._text(turn.content)
        for i, call in enumerate(turn.calls):
            if call.id not in self._call_items:
                out += self._start_call(i, call.id, call.name)
        if self._message is not None:
            out += self._close_message("incomplete" if cut else "completed")
        for i, call in enumerate(turn.calls):
            index = self._call_items[call.id]
            item = self._item(index)
            if isinstance(item, FunctionCallOutput):
                if not item.arguments and call.arguments:  # a model that does not stream: the arguments as one delta
                    out.append(self._emit(ArgumentsDeltaEvent(type="response.function_call_arguments.delta",
                                                              item_id=item.id, output_index=index,
                                                              delta=call.arguments)))
                item.arguments = call.arguments
                item.status = "incomplete" if cut and i == len(turn.calls) - 1 else "completed"
                out += [self._emit(ArgumentsDoneEvent(type="response.function_call_arguments.done", item_id=item.id,
                                                      output_index=index, arguments=call.arguments)),
                        self._done(index)]
            elif isinstance(item, FileSearchCallOutput):
                item.queries, item.status = [_query(call.arguments)], "searching"
                if cut and i == len(turn.calls) - 1:
                    self._cut_calls.add(call.id)
                out.append(self._status(item, "response.file_search_call.searching"))
        return out

    def _close_message(self, status: str) -> list[ResponseEvent]:
        index = self._message
        item = self._item(index)
        assert isinstance(item, OutputMessage)
        item.status = status  # type: ignore[assignment]
        part = item.content[0]
        return [self._emit(TextDoneEvent(type="response.output_text.done", item_id=item.id, output_index=index,
                                         text=part.text)),
                self._emit(ContentPartEvent(type="response.content_part.done", item_id=item.id, output_index=index,
                                            part=part.model_copy())),
                self._done(index)]

    def _tool_result(self, result: ToolResult) -> list[ResponseEvent]:
        index = self._call_items.get(result.call_id)
        item = self._item(index) if index is not None else None
        if not isinstance(item, FileSearchCallOutput):
            return []
        # a call cut off by max_tokens, or one the loop refused to run (past max_tool_calls or max_repeats, or after
        # the run stopped), is incomplete; one that ran and failed is failed
        incomplete = result.error_type in _NOT_RUN or result.call_id in self._cut_calls
        item.status = "completed" if result.ok else "incomplete" if incomplete else "failed"
        if result.ok and self._include_results and self._recorder is not None:
            item.results = self._recorder.results(item.queries[0])
        out = [self._status(item, "response.file_search_call.completed")] if result.ok else []
        return out + [self._done(index)]  # type: ignore[arg-type]

    def _close_open(self) -> list[ResponseEvent]:
        """Items a run left open (it stopped before running a turn's searches, or a turn broke off): incomplete."""
        out: list[ResponseEvent] = []
        for index in sorted(self._open):
            item = self._item(index)
            if index == self._message:
                out += self._close_message("incomplete")
                continue
            item.status = "incomplete"
            out.append(self._done(index))
        return out

    # -- the end --------------------------------------------------------------------------------------------------
    def _finish(self, finished: RunFinished) -> list[ResponseEvent]:
        out = self._close_open()
        r = self.response
        r.usage = ResponseUsage(input_tokens=finished.prompt_tokens,
                                input_tokens_details=InputTokensDetails(cached_tokens=finished.cached_tokens),
                                output_tokens=finished.completion_tokens, total_tokens=finished.total_tokens)
        r.freehold = RunInfo(stop_reason=finished.stop_reason.value, detail=finished.detail, context=self.context)
        if finished.stop_reason is StopReason.ERROR:
            r.status, r.error = "failed", ResponseError(code="server_error", message=finished.detail)
        elif self._cut_by_tokens(finished):
            r.status, r.incomplete_details = "incomplete", IncompleteDetails(reason="max_output_tokens")
        elif finished.stop_reason in (StopReason.ANSWER, StopReason.CLIENT_TOOLS):
            r.status = "completed"
        else:  # max_tool_calls, max_steps, loop_detected, timeout: OpenAI's reasons have no name for these
            r.status = "incomplete"
        return out + [self._lifecycle(_LIFECYCLE_EVENT[r.status])]

    def _cut_by_tokens(self, finished: RunFinished) -> bool:
        """The last turn hit its max_tokens, or max_output_tokens left no room for another turn."""
        if finished.stop_reason in (StopReason.ANSWER, StopReason.CLIENT_TOOLS):
            return self._last_finish == "length"
        return finished.stop_reason is StopReason.BUDGET and self._max_output_tokens is not None \
            and finished.completion_tokens >= self._max_output_tokens

    # -- events ---------------------------------------------------------------------------------------------------
    def _item(self, index: int | None) -> OutputItem:
        assert index is not None
        return self.response.output[index]

    def _add(self, item: OutputItem) -> ResponseEvent:
        self.response.output.append(item)
        index = len(self.response.output) - 1
        self._open.add(index)
        return self._emit(OutputItemEvent(type="response.output_item.added", output_index=index,
                                          item=item.model_copy(deep=True)))

    def _done(self, index: int) -> ResponseEvent:
        self._open.discard(index)
        return self._emit(OutputItemEvent(type="response.output_item.done", output_index=index,
                                          item=self._item(index).model_copy(deep=True)))

    def _status(self, item: FileSearchCallOutput, kind: str) -> ResponseEvent:
        return self._emit(ItemStatusEvent(type=kind, item_id=item.id, output_index=self._call_index(item)))

    def _call_index(self, item: OutputItem) -> int:
        return next(i for i, it in enumerate(self.response.output) if it is item)

    def _lifecycle(self, kind: str) -> ResponseEvent:
        return self._emit(ResponseLifecycleEvent(type=kind, response=self.response.model_copy(deep=True)))

    def _emit(self, event: ResponseEvent) -> ResponseEvent:
        event.sequence_number = self._sequence
        self._sequence += 1
        return event


def _query(arguments: str) -> str:
    """The query of a file_search call (its arguments as generated; "" if they are not a JSON object with one)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return ""
    query = value.get("query") if isinstance(value, dict) else None
    return query if isinstance(query, str) else ""
