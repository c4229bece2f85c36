"""The server's own engine as the agent loop's `ChatModel` (freehold.agent.models): each turn is what a chat
completions request with tools is (`freehold.server.chat`): the tools and the history rendered for the template,
the call grammar compiled, the prompt encoded and checked, one engine request run, and its text read as it streams
into content and calls (`ToolCallStream`).

    model = EngineModel(serving, name, "resp_...", SamplingParams(temperature=0.7), structured=None)
    await model.prepare(messages, tools, max_tokens=..., tool_choice=..., parallel_tool_calls=...)   # first turn
    async for event in model.turn(messages, tools, ...): ...   # ContentDelta / CallStart / ArgumentsDelta, TurnResult

`prepare` does the first turn's checks before any response starts, so that a bad request (a tool schema the
grammar cannot enforce, a prompt over the context) is an HTTP 400; its error propagates as is. The turn it
prepared is the first `turn` (when asked with the same arguments). A later turn that fails (its prompt, grown by
tool results, no longer fits; the server shuts down) raises `ModelError`, which ends the run with an error.
"""
from __future__ import annotations

import dataclasses
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator

from freehold.agent.events import CallRecord
from freehold.agent.models import ModelError, TurnEvent, TurnResult
from freehold.engine.async_engine import EngineDeadError
from freehold.errors import FreeholdError
from freehold.server.errors import APIError
from freehold.server.serving import Serving, UsageTally
from freehold.server.structured import RequestedConstraint
from freehold.server.tool_calls import (finish_reason, parses_calls, prompt_messages, request_constraint,
                                        template_tools)
from freehold.tools.parse import ArgumentsDelta, CallStart, ContentDelta, ToolCallStream, ToolEvent
from freehold.tools.spec import ToolRequest, tool_request
from freehold.types import SamplingParams


@dataclass(frozen=True)
class _Prepared:
    """A turn ready to run: what it was asked with, and the engine request it becomes."""

    asked: tuple[Any, ...]  # (messages, tools, max_tokens, tool_choice, parallel_tool_calls)
    tools: ToolRequest | None
    prompt_ids: list[int]
    params: SamplingParams


class EngineModel:
    """One response's model: turns run on the server's engine, with the request's sampling fields."""

    def __init__(self, serving: Serving, name: str, request_id: str, params: SamplingParams,
                 structured: RequestedConstraint | None = None):
        """`params` holds the request's sampling fields (each turn sets max_tokens); `structured` is the output
        format the request asked for (only without tools: `request_constraint`)."""
        self.name = name
        self.serving = serving
        self.request_id = request_id
        self.params = params
        self.structured = structured
        self.num_turns = 0
        self._prepared: _Prepared | None = None

    async def prepare(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, max_tokens: int,
                      tool_choice: str | dict[str, Any] = "auto", parallel_tool_calls: bool = True) -> None:
        """The first turn's checks and encoding, now: InvalidRequestError, PromptTooLongError or APIError if the
        request cannot run."""
        self._prepared = await self._prepare(messages, tools, max_tokens, tool_choice, parallel_tool_calls)

    async def turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, max_tokens: int,
                   tool_choice: str | dict[str, Any] = "auto",
                   parallel_tool_calls: bool = True) -> AsyncIterator[TurnEvent]:
        self.num_turns += 1
        prepared = self._take_prepared((messages, tools, max_tokens, tool_choice, parallel_tool_calls))
        if prepared is None:
            try:
                prepared = await self._prepare(messages, tools, max_tokens, tool_choice, parallel_tool_calls)
            except (FreeholdError, APIError) as exc:
                raise ModelError(str(exc)) from exc
        async for event in self._run(prepared):
            yield event

    # -- private ------------------------------------------------------------------------------------------------
    def _take_prepared(self, asked: tuple[Any, ...]) -> _Prepared | None:
        prepared, self._prepared = self._prepared, None
        return prepared if prepared is not None and prepared.asked == asked else None

    async def _prepare(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int,
                       tool_choice: str | dict[str, Any], parallel_tool_calls: bool) -> _Prepared:
        """What chat.py does before a request runs: tools validated, history rendered, grammar compiled, prompt
        encoded; max_tokens is cut to the room the context leaves (the loop's budgets are upper bounds)."""
        serving = self.serving
        request = tool_request(tools or None, tool_choice if tools else None, parallel_tool_calls if tools else None)
        rendered = prompt_messages(messages, request, serving.tokenizer)
        constraint = await serving.compile_constraint(request_constraint(request, self.structured))
        prompt_ids = await serving.encode_chat(rendered, template_tools(request, serving.tokenizer))
        room = serving.max_model_len - len(prompt_ids)
        params = dataclasses.replace(self.params, max_tokens=max(1, min(max_tokens, room)), n=1,
                                     constraint=constraint)
        serving.check_request(prompt_ids, params)
        asked = (messages, tools, max_tokens, tool_choice, parallel_tool_calls)
        return _Prepared(asked, request, prompt_ids, params)

    async def _run(self, prepared: _Prepared) -> AsyncIterator[TurnEvent]:
        """The engine request's text as content and call events, then the TurnResult built from those events (so
        that the calls' ids are the ones streamed)."""
        tally = UsageTally()
        parser = ToolCallStream() if parses_calls(prepared.tools) else None
        turn = _Turn()
        reason = None
        deltas = self.serving.run(f"{self.request_id}-turn{self.num_turns}", prepared.prompt_ids, prepared.params,
                                  tally)
        try:
            async with aclosing(deltas):  # type: ignore[type-var]
                async for step in deltas:
                    for d in step:
                        reason = d.finish_reason or reason
                        for event in _events(parser, d.text, finished=d.finish_reason is not None):
                            turn.add(event)
                            yield event
        except (EngineDeadError, FreeholdError) as exc:
            raise ModelError(f"generation failed: {exc}") from exc
        yield TurnResult(turn.content or None, turn.calls(), finish_reason(reason, bool(turn.starts)),
                         tally.prompt_tokens, tally.cached_tokens, tally.completion_tokens)


def _events(parser: ToolCallStream | None, text: str, finished: bool) -> list[ToolEvent]:
    if parser is None:
        return [ContentDelta(text)] if text else []
    events = parser.push(text) if text else []
    return events + parser.finish() if finished else events


class _Turn:
    """A turn's content and calls, added up from its events."""

    def __init__(self) -> None:
        self.content = ""
        self.starts: list[CallStart] = []
        self.arguments: dict[int, str] = {}

    def add(self, event: ToolEvent) -> None:
        if isinstance(event, ContentDelta):
            self.content += event.text
        elif isinstance(event, CallStart):
            self.starts.append(event)
            self.arguments[event.index] = ""
        elif isinstance(event, ArgumentsDelta):
            self.arguments[event.index] += event.text

    def calls(self) -> list[CallRecord]:
        return [CallRecord(s.id, s.name, self.arguments[s.index]) for s in self.starts]
