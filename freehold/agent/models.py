"""Who answers a turn. The loop needs one thing from a model: given the messages and the offered tools, a turn's
text and calls, with token counts. `ChatModel.turn` yields the turn as it streams (`ContentDelta`, `CallStart`,
`ArgumentsDelta` from freehold.tools.parse; a model that does not stream yields none) and ends with a `TurnResult`.

- `LocalModel`: an in-process `LLM` (calls constrained: every call names an offered tool, arguments valid JSON).
- `RemoteModel`: any OpenAI-compatible server's `/chat/completions` (nothing guarantees its calls are well-formed:
  the loop checks them).
The server's own model (for the Responses API) is freehold.server.engine_model.EngineModel.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Protocol, TypeVar

from freehold.agent.events import CallRecord
from freehold.errors import FreeholdError
from freehold.tools.parse import ArgumentsDelta, CallStart, ContentDelta
from freehold.types import SamplingParams

if TYPE_CHECKING:
    from freehold.llm import LLM

T = TypeVar("T")


class ToolExit(Exception):
    """A SystemExit or KeyboardInterrupt raised by a tool's code: carried as an ordinary exception, so it is fed
    back to the model like any other failure instead of ending the run (or the event loop)."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


class ModelError(Exception):
    """The model could not be asked or gave no usable turn; the run ends with StopReason.ERROR."""


@dataclass(frozen=True)
class TurnResult:
    content: str | None  # text outside the calls (None when empty)
    calls: list[CallRecord]
    finish_reason: str | None  # "stop", "tool_calls", "length", ...
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


TurnEvent = ContentDelta | CallStart | ArgumentsDelta | TurnResult


class ChatModel(Protocol):
    name: str

    def turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, max_tokens: int,
             tool_choice: str | dict[str, Any] = "auto", parallel_tool_calls: bool = True) -> AsyncIterator[TurnEvent]:
        """Stream one assistant turn; the last item is its TurnResult. Raises ModelError."""
        ...


async def in_daemon_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on its own daemon thread. Unlike asyncio.to_thread, a call that is given up on (a tool past
    its timeout, a model turn past the run's deadline: the awaiting task is cancelled) is abandoned, not waited for:
    Python cannot kill a thread, so it runs on, holds up neither the run nor a pool nor interpreter exit, and its
    result is dropped. A call that returns is joined (it has only its exit left), so no thread that ran native code
    is still unwinding when the interpreter exits (that raced into `std::terminate` at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def hand_over(setter: Callable[[Any], None], value: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle, setter, value)
        except RuntimeError:  # the run's event loop is closed: nobody waits for this result
            pass

    def work() -> None:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # handed to the awaiting loop
            hand_over(future.set_exception, exc)
        except BaseException as exc:  # SystemExit / KeyboardInterrupt of the work's own code: not the caller's end
            hand_over(future.set_exception, ToolExit(exc))
        else:
            hand_over(future.set_result, result)

    thread = threading.Thread(target=work, daemon=True, name=f"agent-{getattr(fn, '__name__', 'call')}")
    thread.start()
    try:
        return await future
    finally:
        if future.done() and not future.cancelled():
            thread.join(timeout=1.0)  # returns at once: the thread's work is done


_LLM_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one turn at a time per LLM (one engine)


class LocalModel:
    """An in-process LLM. Greedy by default (`params` to change it); one turn at a time per LLM."""

    def __init__(self, llm: LLM, params: SamplingParams | None = None):
        self.llm = llm
        self.name = llm.loaded.config.name
        self.params = params or SamplingParams(temperature=0.0)
        self._lock = _LLM_LOCKS.setdefault(llm, threading.Lock())

    async def turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, max_tokens: int,
                   tool_choice: str | dict[str, Any] = "auto", parallel_tool_calls: bool = True) -> AsyncIterator[TurnEvent]:
        result = await in_daemon_thread(self._turn, messages, tools, max_tokens, tool_choice, parallel_tool_calls)
        yield result

    def _turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int,
              tool_choice: str, parallel_tool_calls: bool) -> TurnResult:
        params = dataclasses.replace(self.params, max_tokens=max_tokens, n=1)
        try:
            with self._lock:
                gen = self.llm.chat(messages, params, tools=tools or None,
                                    tool_choice=tool_choice if tools else None,
                                    parallel_tool_calls=parallel_tool_calls if tools else None)[0]
        except FreeholdError as exc:
            raise ModelError(str(exc)) from exc
        c = gen.completions[0]
        calls = [CallRecord(call.id, call.name, call.arguments) for call in c.tool_calls]
        content = c.content if tools else (c.text or None)
        return TurnResult(content, calls, c.finish_reason.value if c.finish_reason else None,
                          len(gen.prompt_token_ids), gen.num_cached_tokens, len(c.token_ids))


class RemoteModel:
    """Any OpenAI-compatible server: POST {base_url}/chat/completions (base_url as the `openai` client takes it,
    e.g. http://localhost:8000/v1). Greedy (temperature 0) unless `extra` says otherwise."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, extra: dict[str, Any] | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model or self.base_url
        self.api_key = api_key
        self.timeout = timeout
        self.extra = {"temperature": 0.0, **(extra or {})}

    async def turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, max_tokens: int,
                   tool_choice: str | dict[str, Any] = "auto", parallel_tool_calls: bool = True) -> AsyncIterator[TurnEvent]:
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, **self.extra}
        if self.model is not None:
            body["model"] = self.model
        if tools:
            body |= {"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls}
        reply = await in_daemon_thread(self._post, "/chat/completions", body)
        yield _turn_from_reply(reply)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ModelError(f"{self.base_url}{path}: HTTP {exc.code}: {_error_message(exc)}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ModelError(f"{self.base_url}{path}: {exc}") from None


def _turn_from_reply(reply: dict[str, Any]) -> TurnResult:
    try:
        choice = reply["choices"][0]
        message = choice["message"]
        calls = [CallRecord(str(c.get("id") or f"call_{i}"), str(c["function"]["name"]),
                            _arguments_text(c["function"].get("arguments")))
                 for i, c in enumerate(message.get("tool_calls") or [])]
        usage = reply.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return TurnResult(message.get("content") or None, calls, choice.get("finish_reason"),
                          int(usage.get("prompt_tokens") or 0), int(cached), int(usage.get("completion_tokens") or 0))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ModelError(f"not a chat completion: {exc!r} in {str(reply)[:300]}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body.get("error", {}).get("message") or body)[:500]
    except Exception:  # not JSON: the status line says enough
        return exc.reason if isinstance(exc.reason, str) else "error"


def _arguments_text(arguments: Any) -> str:
    """A call's arguments as JSON text, whatever a server sent: a string as is, an object or list dumped."""
    if arguments is None:
        return ""
    if isinstance(arguments, str):
        return arguments
    try:
        return json.dumps(arguments)
    except (TypeError, ValueError, RecursionError):
        return str(arguments)

