"""The agent loop: model turn -> tool calls (a turn's calls run concurrently) -> results appended -> next turn,
until a turn makes no call (its text is the answer) or a limit ends the run. Nothing a tool or the model does ends
the run by raising: a tool's exception, a timeout, invalid arguments or an unknown tool become the `tool` message
the model sees next ("<kind>: <Type>: <message>", cut to max_result_chars), and the run goes on.

    agent = Agent(LLM(), [calculator], instructions="Use the calculator for arithmetic.")
    result = agent.run("What is 1234 * 5678?", trace="run.jsonl")
    result.stop_reason, result.answer

`model` is an in-process `LLM`, the base URL of an OpenAI-compatible server ("http://host:8000/v1"), or any
`ChatModel`. The run's events stream from `Agent.events(...)` (async) or `Agent.run(..., on_event=print)`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from freehold.agent.events import (CallDelta, CallRecord, Event, ModelTurn, RunFinished, RunStarted, TextDelta,
                                   ToolResult)
from freehold.agent.functions import FunctionTool, ToolArgumentError, as_tool
from freehold.agent.limits import Limits, StopReason
from freehold.agent.models import (ChatModel, LocalModel, ModelError, RemoteModel, ToolExit, TurnResult,
                                   in_daemon_thread)
from freehold.agent.trace import TraceWriter
from freehold.tools.parse import ArgumentsDelta, CallStart, ContentDelta
from freehold.tools.prompt import replayable_arguments


# A repeated call's message repeats a result up to this long; a longer one (search passages) is said once, in the
# last copy's message (a small model tends to answer with the last tool message), the earlier copies pointing to it.
REPEAT_RESULT_CHARS = 256


@dataclass
class RunResult:
    stop_reason: StopReason
    answer: str | None
    detail: str
    messages: list[dict[str, Any]]  # the whole conversation, tool results included
    events: list[Event] = field(default_factory=list)  # the traced events (no text deltas)

    @property
    def finished(self) -> RunFinished:
        return self.events[-1]  # type: ignore[return-value]


class Agent:
    def __init__(self, model: Any, tools: Sequence[Callable[..., Any] | FunctionTool] = (), *,
                 instructions: str | None = None, limits: Limits = Limits(), api_key: str | None = None,
                 tool_choice: str | dict[str, Any] = "auto", parallel_tool_calls: bool = True,
                 retries_after_error: int = 0):
        """`tool_choice` (OpenAI's: "auto", "none", "required" or a named function) applies to the first turn; later
        turns are "auto" (or "none"), so a forced call cannot force calls for ever.

        `retries_after_error`: how many times in a run a turn that follows a failed call must call a tool again (the
        failed tool when one tool failed, any tool otherwise), with the error in view. A small model tends to answer
        an error by repeating it; this makes it retry. The retries count against every limit (max_repeats too)."""
        self.model: ChatModel = _chat_model(model, api_key)
        self.tools = {t.name: t for t in map(as_tool, tools)}
        if len(self.tools) != len(tools):
            raise ValueError("tool names must be unique")
        self.instructions = instructions
        self.limits = limits
        self.tool_choice = tool_choice
        self.parallel_tool_calls = parallel_tool_calls
        if retries_after_error < 0:
            raise ValueError(f"retries_after_error must be at least 0, got {retries_after_error}")
        if retries_after_error and not self.tools:
            raise ValueError("retries_after_error needs tools to call again, and there are none")
        if retries_after_error and tool_choice == "none":
            raise ValueError("retries_after_error cannot force calls under tool_choice 'none'")
        self.retries_after_error = retries_after_error

    def run(self, task: str | list[dict[str, Any]], *, trace: str | Path | None = None,
            on_event: Callable[[Event], None] | None = None) -> RunResult:
        """Run to the end (blocking). Called from inside a running event loop, it runs on its own thread and blocks
        that loop's thread until the run ends (use `events` there instead)."""
        async def consume() -> RunResult:
            run = _Run(self, task)
            async for event in self._traced(run, trace):
                if on_event is not None:
                    on_event(event)
            return RunResult(run.stop_reason, run.answer, run.detail, run.messages, run.traced)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(consume())
        box: list[RunResult | BaseException] = []
        thread = threading.Thread(target=lambda: box.append(_capture(lambda: asyncio.run(consume()))))
        thread.start()
        thread.join()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    async def events(self, task: str | list[dict[str, Any]], *,
                     trace: str | Path | None = None) -> AsyncIterator[Event]:
        """The run's events as they happen; the last is RunFinished."""
        async for event in self._traced(_Run(self, task), trace):
            yield event

    async def _traced(self, run: _Run, trace: str | Path | None) -> AsyncIterator[Event]:
        writer = TraceWriter(trace) if trace is not None else None
        try:
            async for event in run.go():
                if writer is not None:
                    writer.write(event)
                yield event
        finally:
            if writer is not None:
                writer.close()


class _Run:
    """One run's state: messages, counters and how it ended."""

    def __init__(self, agent: Agent, task: str | list[dict[str, Any]]):
        self.agent, self.limits = agent, agent.limits
        self.messages = _first_messages(agent.instructions, task)
        self.task = task if isinstance(task, str) else _last_user_text(task)
        self.start = time.monotonic()
        self.steps = self.num_tool_calls = self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.last_prompt_tokens = self.last_completion_tokens = 0  # of the last turn
        self.seen_calls: dict[str, int] = {}  # canonical (name, arguments) -> times asked
        self.stop_reason, self.answer, self.detail, self.done = StopReason.ERROR, None, "", False
        self.client_calls: list[CallRecord] = []
        self.traced: list[Event] = []
        self.retries_left = agent.retries_after_error
        self.failed_tools: list[str] = []  # the tools whose calls failed in the last turn (existing tools only)
        self.last_turn_failed = False

    def now(self) -> float:
        return time.monotonic() - self.start

    async def go(self) -> AsyncIterator[Event]:
        yield self._record(RunStarted(0.0, secrets.token_hex(4), self.agent.model.name, self.task,
                                      list(self.agent.tools), self.limits.as_dict()))
        while self._may_take_turn():
            self.steps += 1
            turn: TurnResult | None = None
            async for event in self._turn():
                if isinstance(event, TurnResult):
                    turn = event
                else:
                    yield self._record(event)
            if turn is None or not self._after_turn(turn):
                break
            async for event in self._run_calls(turn.calls):
                yield self._record(event)
            if self.done:  # a limit stopped the turn's calls
                break
            if self.client_calls:
                self._stop(StopReason.CLIENT_TOOLS, f"{len(self.client_calls)} call(s) for the caller to run")
                break
        yield self._record(RunFinished(self.now(), self.stop_reason, self.answer, self.detail, self.steps,
                                       self.num_tool_calls, self.prompt_tokens, self.cached_tokens,
                                       self.completion_tokens, self.client_calls))

    # -- limits -------------------------------------------------------------------------------------------------
    def _may_take_turn(self) -> bool:
        if self.steps >= self.limits.max_steps:
            return self._stop(StopReason.MAX_STEPS, f"max_steps ({self.limits.max_steps}) model turns taken")
        if self.now() >= self.limits.max_seconds:
            return self._stop(StopReason.TIMEOUT, f"max_seconds ({self.limits.max_seconds:g} s) passed")
        if self._turn_tokens() < 1:
            return self._stop(StopReason.BUDGET, "the token budget is spent")
        return True

    def _turn_tokens(self) -> int:
        """max_tokens for the next turn: the per-turn cap, within what the run's budgets leave."""
        left = [self.limits.max_turn_tokens]
        if self.limits.max_output_tokens is not None:
            left.append(self.limits.max_output_tokens - self.completion_tokens)
        if self.limits.max_total_tokens is not None:  # the next prompt holds at least the last prompt and reply
            spent = self.prompt_tokens + self.completion_tokens
            left.append(self.limits.max_total_tokens - spent - self.last_prompt_tokens - self.last_completion_tokens)
        return min(left)

    def _stop(self, reason: StopReason, detail: str) -> bool:
        self.stop_reason, self.detail, self.done = reason, detail, True
        return False

    # -- a model turn -------------------------------------------------------------------------------------------
    async def _turn(self) -> AsyncIterator[Event | TurnResult]:
        """The turn's deltas as events, then its TurnResult (nothing on an error or timeout: the run stops)."""
        started = time.monotonic()
        choice = self._tool_choice()
        stream = self.agent.model.turn(self.messages, [t.as_openai() for t in self.agent.tools.values()],
                                       max_tokens=self._turn_tokens(), tool_choice=choice,  # type: ignore[arg-type]
                                       parallel_tool_calls=self.agent.parallel_tool_calls)
        deadline = self.start + self.limits.max_seconds
        try:
            while True:
                try:
                    item = await asyncio.wait_for(anext(stream), timeout=max(deadline - time.monotonic(), 0.001))
                except StopAsyncIteration:
                    self._stop(StopReason.ERROR, "the model's turn ended without a result")
                    return
                if isinstance(item, TurnResult):
                    yield ModelTurn(self.now(), self.steps, item.prompt_tokens, item.cached_tokens,
                                    item.completion_tokens, time.monotonic() - started, item.content, item.calls,
                                    item.finish_reason)
                    yield item
                    return
                yield self._delta(item)
        except asyncio.TimeoutError:
            self._stop(StopReason.TIMEOUT, f"max_seconds ({self.limits.max_seconds:g} s) passed during model turn "
                                           f"{self.steps}")
        except ModelError as exc:
            self._stop(StopReason.ERROR, f"model turn {self.steps} failed: {exc}")
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def _tool_choice(self) -> str | dict[str, Any]:
        """The first turn's is the agent's; later turns are "auto", or a forced retry after a failed call (not on the
        last step or with no tool call left: there the model may still answer)."""
        if self.steps == 1 or self.agent.tool_choice == "none":
            return self.agent.tool_choice
        room = self.steps < self.limits.max_steps and self.num_tool_calls < self.limits.max_tool_calls
        if self.last_turn_failed and self.retries_left > 0 and room:  # not on the last step or with no call left
            self.retries_left -= 1
            if len(set(self.failed_tools)) == 1:
                return {"type": "function", "function": {"name": self.failed_tools[0]}}
            return "required"
        return "auto"

    def _delta(self, item: ContentDelta | CallStart | ArgumentsDelta) -> Event:
        if isinstance(item, ContentDelta):
            return TextDelta(self.now(), self.steps, item.text)
        if isinstance(item, CallStart):
            return CallDelta(self.now(), self.steps, item.index, item.id, item.name, "")
        return CallDelta(self.now(), self.steps, item.index, None, None, item.text)

    def _after_turn(self, turn: TurnResult) -> bool:
        """Count the turn and append it; True if it made calls (to run next)."""
        self.prompt_tokens += turn.prompt_tokens
        self.cached_tokens += turn.cached_tokens
        self.completion_tokens += turn.completion_tokens
        self.last_prompt_tokens, self.last_completion_tokens = turn.prompt_tokens, turn.completion_tokens
        self.messages.append(_assistant_message(turn))
        if not turn.calls:
            self.answer = turn.content or ""
            return self._stop(StopReason.ANSWER, f"answered in {self.steps} step(s)")
        return True

    # -- tool calls ---------------------------------------------------------------------------------------------
    async def _run_calls(self, calls: list[CallRecord]) -> AsyncIterator[Event]:
        """Run the turn's calls concurrently (the same call twice runs once; a result longer than REPEAT_RESULT_CHARS
        is in the prompt once, in the last copy's message), each within max_tool_calls and
        max_repeats; a call past a limit is answered "not run" and the run then stops. Every call of the loop's
        own gets its `tool` message, in the order asked; client calls are handed back."""
        mine = [c for c in calls if not self._is_client_call(c)]
        self.client_calls = [c for c in calls if self._is_client_call(c)]
        runnable, refused = self._admit_calls(_unique_calls(mine))
        self.num_tool_calls += len(runnable)
        done = dict(zip(runnable, await asyncio.gather(*(self._execute(c) for c in runnable.values()))))
        failed = [r for r in done.values() if not r.ok]
        self.last_turn_failed = bool(failed)
        self.failed_tools = [r.name for r in failed if r.name in self.agent.tools]
        last_copy = {_call_key(call): i for i, call in enumerate(mine)}
        for i, call in enumerate(mine):  # a repeated call gets the result of its first copy
            key = _call_key(call)
            result = done.get(key) or ToolResult(self.now(), self.steps, call.id, call.name, call.arguments, False,
                                                 refused[key][1], refused[key][0], 0.0)
            result = dataclasses.replace(result, call_id=call.id, arguments=call.arguments)
            content = result.output
            if i < last_copy[key] and len(content) > REPEAT_RESULT_CHARS:
                content = "(the same call is made again below: its result is there)"
            self.messages.append({"role": "tool", "tool_call_id": result.call_id, "content": content})
            yield result

    def _admit_calls(self, unique: dict[str, CallRecord]) -> tuple[dict[str, CallRecord], dict[str, tuple[str, str]]]:
        """(calls to run, {key: (kind, message)} for calls that will not run); the first limit hit ends the run."""
        runnable: dict[str, CallRecord] = {}
        refused: dict[str, tuple[str, str]] = {}
        for key, call in unique.items():
            if self.done:
                refused[key] = ("not_run", f"error (not_run): not run, the run stopped: {self.detail}")
                continue
            self.seen_calls[key] = self.seen_calls.get(key, 0) + 1
            if self.seen_calls[key] > self.limits.max_repeats:
                self._stop(StopReason.LOOP_DETECTED, f"{call.name}({call.arguments}) asked for {self.seen_calls[key]} "
                                                     f"times (max_repeats {self.limits.max_repeats})")
                refused[key] = ("loop_detected", f"error (loop_detected): not run: {self.detail}")
            elif self.num_tool_calls + len(runnable) >= self.limits.max_tool_calls:
                self._stop(StopReason.BUDGET, f"max_tool_calls ({self.limits.max_tool_calls}) reached")
                refused[key] = ("budget", f"error (budget): not run: {self.detail}")
            else:
                runnable[key] = call
        return runnable, refused

    def _is_client_call(self, call: CallRecord) -> bool:
        tool = self.agent.tools.get(call.name)
        return tool is not None and tool.function is None

    async def _execute(self, call: CallRecord) -> ToolResult:
        started = time.monotonic()
        ok, output, kind = True, "", None
        try:
            output = _as_text(await self._call(call))
        except _CallFailed as failure:
            ok, kind, output = False, failure.kind, str(failure)
        output = _truncate(output, self.limits.max_result_chars)
        return ToolResult(self.now(), self.steps, call.id, call.name, call.arguments, ok, output, kind,
                          time.monotonic() - started)

    async def _call(self, call: CallRecord) -> Any:
        tool = self.agent.tools.get(call.name)
        if tool is None:
            raise _CallFailed("unknown_tool", f"no tool named {call.name!r}; the tools are: "
                                              f"{', '.join(self.agent.tools) or '(none)'}")
        try:
            arguments = tool.validate(json.loads(call.arguments) if call.arguments.strip() else {})
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; RecursionError: deep nesting
            if isinstance(exc, ToolArgumentError):
                raise _CallFailed("invalid_arguments", f"invalid arguments for {call.name}: {exc}") from None
            raise _CallFailed("invalid_arguments", f"arguments are not valid JSON ({_short(exc)})") from None
        timeout = min(tool.timeout or self.limits.tool_timeout,
                      max(self.start + self.limits.max_seconds - time.monotonic(), 0.001))
        try:
            if tool.is_async:
                return await asyncio.wait_for(_guarded(tool.function(**arguments)), timeout)  # type: ignore[misc]
            return await asyncio.wait_for(in_daemon_thread(tool.function, **arguments), timeout)  # type: ignore[arg-type]
        except asyncio.TimeoutError:
            raise _CallFailed("timeout", f"TimeoutError: {call.name} did not finish within {timeout:.3g} s") \
                from None
        except Exception as exc:  # any failure of the tool is the model's to hear about, not the run's end
            raise _CallFailed("exception", _short(exc)) from None

    def _record(self, event: Event) -> Event:
        if not isinstance(event, (TextDelta, CallDelta)):
            self.traced.append(event)
        return event


class _CallFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"error ({kind}): {message}")
        self.kind = kind


def _chat_model(model: Any, api_key: str | None) -> ChatModel:
    if isinstance(model, str):
        if not model.startswith(("http://", "https://")):
            raise ValueError(f"model {model!r}: give an LLM, a ChatModel, or a server's base URL (http://...)")
        return RemoteModel(model, api_key=api_key)
    if hasattr(model, "turn") and hasattr(model, "name"):
        return model
    from freehold.llm import LLM
    if isinstance(model, LLM):
        return LocalModel(model)
    raise TypeError(f"model must be an LLM, a ChatModel or a URL, got {type(model).__name__}")


def _first_messages(instructions: str | None, task: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(task, str):
        return messages + [{"role": "user", "content": task}]
    return messages + [dict(m) for m in task]


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def _assistant_message(turn: TurnResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": turn.content}
    if turn.calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": replayable_arguments(c.arguments)}}
                                 for c in turn.calls]
    return message


def _unique_calls(calls: list[CallRecord]) -> dict[str, CallRecord]:
    """The first of each distinct call (name and arguments), keyed by _call_key, in order."""
    unique: dict[str, CallRecord] = {}
    for call in calls:
        unique.setdefault(_call_key(call), call)
    return unique


def _call_key(call: CallRecord) -> str:
    try:
        arguments = json.dumps(json.loads(call.arguments), sort_keys=True)
    except (ValueError, RecursionError):
        arguments = call.arguments
    return f"{call.name}\0{arguments}"


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... [{len(text) - limit} more characters cut]"


async def _guarded(work: Any) -> Any:
    """An async tool's coroutine, with SystemExit / KeyboardInterrupt turned into ToolExit (asyncio would otherwise
    re-raise them out of the event loop: a tool calling sys.exit must not end the run)."""
    try:
        return await work
    except (SystemExit, KeyboardInterrupt) as exc:
        raise ToolExit(exc) from None


def _short(exc: BaseException) -> str:
    """"Type: message" of a tool's failure (the original type for a ToolExit), at most 1,000 characters."""
    if isinstance(exc, ToolExit):
        exc = exc.original
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 1000 else text[:1000] + "..."


def _capture(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except BaseException as exc:  # re-raised on the caller's thread
        return exc
