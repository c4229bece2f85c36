"""What a run reports as it goes: one typed event per model turn and per tool execution, between a start and a
finish. `t` is seconds since the run started. `TextDelta` / `CallDelta` stream a turn's text as it is generated
(when the model streams) and are not written to the trace; every other event is one JSONL line (trace.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from freehold.agent.limits import StopReason


@dataclass(frozen=True)
class CallRecord:
    """One tool call as the model asked for it."""

    id: str
    name: str
    arguments: str  # JSON text as generated (may be invalid: cut by max_tokens, or a remote model's)


@dataclass(frozen=True)
class RunStarted:
    type: ClassVar[str] = "run_started"
    t: float
    run_id: str
    model: str
    task: str
    tools: list[str]
    limits: dict[str, Any]


@dataclass(frozen=True)
class TextDelta:
    """Answer text of the turn in progress, as it streams."""

    type: ClassVar[str] = "text_delta"
    t: float
    step: int
    text: str


@dataclass(frozen=True)
class CallDelta:
    """A call of the turn in progress: its start (name set, arguments "") then its arguments in pieces."""

    type: ClassVar[str] = "call_delta"
    t: float
    step: int
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class ModelTurn:
    type: ClassVar[str] = "model_turn"
    t: float
    step: int  # 1-based
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    latency_s: float
    content: str | None  # the text outside calls
    calls: list[CallRecord]
    finish_reason: str | None


@dataclass(frozen=True)
class ToolResult:
    type: ClassVar[str] = "tool_result"
    t: float
    step: int
    call_id: str
    name: str
    arguments: str
    ok: bool
    output: str  # the result, or "<ErrorType>: message", as the model sees it (after truncation)
    error_type: str | None  # unknown_tool, invalid_arguments, timeout, exception (None when ok)
    duration_s: float


@dataclass(frozen=True)
class RunFinished:
    type: ClassVar[str] = "run_finished"
    t: float
    stop_reason: StopReason
    answer: str | None
    detail: str  # why the run stopped, in words
    steps: int
    tool_calls: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    client_calls: list[CallRecord] = field(default_factory=list)  # StopReason.CLIENT_TOOLS: the calls handed back

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = RunStarted | TextDelta | CallDelta | ModelTurn | ToolResult | RunFinished
TRACED = (RunStarted, ModelTurn, ToolResult, RunFinished)  # the events a trace file keeps
EVENT_TYPES: dict[str, type] = {cls.type: cls for cls in (RunStarted, TextDelta, CallDelta, ModelTurn, ToolResult,
                                                           RunFinished)}


def event_dict(event: Event) -> dict[str, Any]:
    """JSON-ready: {"type": ..., fields...}; enums as their values."""
    out: dict[str, Any] = {"type": event.type}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, StopReason):
            value = value.value
        elif isinstance(value, list):
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    return out


def event_from_dict(data: dict[str, Any]) -> Event:
    """The inverse of event_dict (ValueError for an unknown type or missing fields)."""
    data = dict(data)
    cls = EVENT_TYPES.get(data.pop("type", None))
    if cls is None:
        raise ValueError(f"unknown event type in {data!r}")
    if "calls" in data:
        data["calls"] = [CallRecord(**c) for c in data["calls"]]
    if "client_calls" in data:
        data["client_calls"] = [CallRecord(**c) for c in data["client_calls"]]
    if "stop_reason" in data:
        data["stop_reason"] = StopReason(data["stop_reason"])
    try:
        return cls(**data)
    except TypeError as exc:
        raise ValueError(f"bad {cls.type} event: {exc}") from None
