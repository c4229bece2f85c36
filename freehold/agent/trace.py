"""Traces: a run's events as JSONL (one event per line, written and flushed as they happen, so a run that is
killed leaves every finished step on disk), read back, and rendered as a readable timeline
(`freehold agent trace FILE`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Iterable

from freehold.agent.events import (TRACED, CallDelta, Event, ModelTurn, RunFinished, RunStarted, TextDelta,
                                   ToolResult, event_dict, event_from_dict)


class TraceWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def write(self, event: Event) -> None:
        if self._file is None or not isinstance(event, TRACED):
            return
        self._file.write(json.dumps(event_dict(event), ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_trace(path: str | Path) -> list[Event]:
    """Every event of a trace file (several runs may share one file); ValueError names a bad line."""
    events = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(event_from_dict(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: not a trace event: {exc}") from None
    return events


def render(events: Iterable[Event], width: int = 100) -> str:
    """A timeline, one block per event."""
    return "\n".join(line for e in events for line in render_event(e, width))


def render_event(event: Event, width: int = 100) -> list[str]:
    stamp = f"{event.t:7.2f}s"
    if isinstance(event, RunStarted):
        limits = ", ".join(f"{k} {v}" for k, v in event.limits.items() if v is not None)
        return [f"run {event.run_id}  model {event.model}  tools {', '.join(event.tools) or '(none)'}",
                f"  limits: {limits}", f"  task: {_cut(event.task, width)}"]
    if isinstance(event, ModelTurn):
        lines = [f"{stamp}  step {event.step}  model: {event.prompt_tokens} prompt tokens "
                 f"({event.cached_tokens} cached) + {event.completion_tokens} completion, {event.latency_s:.2f} s"
                 + (f", finish {event.finish_reason}" if event.finish_reason not in (None, "stop", "tool_calls")
                    else "")]
        if event.content:
            lines.append(f"{'':10}  says: {_cut(event.content, width)}")
        lines += [f"{'':10}  calls {c.name}({_cut(c.arguments, width)})  [{c.id}]" for c in event.calls]
        return lines
    if isinstance(event, ToolResult):
        status = "ok" if event.ok else f"error ({event.error_type})"
        return [f"{stamp}  step {event.step}  tool {event.name} {status} in {event.duration_s:.2f} s: "
                f"{_cut(event.output, width)}"]
    if isinstance(event, RunFinished):
        lines = [f"{stamp}  finished: {event.stop_reason.value} after {event.steps} step(s), {event.tool_calls} tool "
                 f"call(s), {event.total_tokens} tokens ({event.cached_tokens} cached prompt tokens)",
                 f"{'':10}  {event.detail}"]
        if event.answer is not None:
            lines.append(f"{'':10}  answer: {_cut(event.answer, width)}")
        return lines
    if isinstance(event, (TextDelta, CallDelta)):
        return []
    raise TypeError(f"not an event: {event!r}")


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."
