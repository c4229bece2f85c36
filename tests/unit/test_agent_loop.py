"""The agent loop against a scripted model: limits end runs cleanly, errors are fed back, traces round-trip.
(The loop with the real model: tests/integration/test_agent.py.)"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Literal

import pydantic
import pytest

from freehold.agent import Agent, Limits, StopReason, client_tool, function_tool
from freehold.agent.events import CallRecord, ModelTurn, RunFinished, RunStarted, TextDelta, ToolResult
from freehold.agent.functions import ToolArgumentError, parse_docstring
from freehold.agent.models import ModelError, TurnResult
from freehold.agent.trace import read_trace, render
from freehold.tools.parse import ContentDelta


def call(name: str, arguments: Any, call_id: str | None = None) -> CallRecord:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return CallRecord(call_id or f"call_{name}_{abs(hash(text)) % 10**6}", name, text)


class Scripted:
    """A ChatModel that replays turns: a str is an answer, a list of CallRecord a tool-calling turn, an exception
    is raised, a float sleeps that long first. Keeps the messages of every turn."""

    name = "scripted"

    def __init__(self, *turns: Any, tokens: tuple[int, int, int] = (10, 0, 5)):
        self.turns = list(turns)
        self.tokens = tokens
        self.seen: list[list[dict]] = []
        self.max_tokens: list[int] = []
        self.tool_choices: list[Any] = []

    async def turn(self, messages, tools, *, max_tokens, tool_choice="auto", parallel_tool_calls=True):
        self.seen.append([dict(m) for m in messages])
        self.max_tokens.append(max_tokens)
        self.tool_choices.append(tool_choice)
        script = self.turns.pop(0) if self.turns else "done"
        if isinstance(script, float):
            await asyncio.sleep(script)
            script = "late"
        if isinstance(script, Exception):
            raise script
        prompt, cached, completion = self.tokens
        if isinstance(script, str):
            yield ContentDelta(script)
            yield TurnResult(script, [], "stop", prompt, cached, completion)
        else:
            yield TurnResult(None, list(script), "tool_calls", prompt, cached, completion)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number.
        b: the second
            number, continued.
    """
    return a + b


def boom(x: str) -> str:
    """Always fails."""
    raise RuntimeError(f"broken tool got {x}")


def slow(seconds: float) -> str:
    """Sleeps."""
    time.sleep(seconds)
    return "slept"


def tool_results(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "tool"]


# -- tools from functions ----------------------------------------------------------------------------------------
def test_schema_comes_from_type_hints_and_docstring():
    def weather(city: str, unit: Literal["C", "F"] = "C", days: int = 1) -> str:
        """The weather in a city.

        Args:
            city: the city's name.
            unit: C or F.
        """
        return ""

    tool = function_tool(weather)
    assert tool.name == "weather" and tool.description == "The weather in a city."
    props = tool.parameters["properties"]
    assert props["city"] == {"type": "string", "description": "the city's name."}
    assert props["unit"]["enum"] == ["C", "F"] and props["unit"]["default"] == "C"
    assert tool.parameters["required"] == ["city"] and tool.parameters["additionalProperties"] is False
    assert tool.validate({"city": "Paris"}) == {"city": "Paris", "unit": "C", "days": 1}
    for bad, words in [({}, "city"), ({"city": "P", "unit": "K"}, "unit"), ({"city": "P", "days": "x"}, "days"),
                       ({"city": "P", "extra": 1}, "extra"), ([1], "object")]:
        with pytest.raises(ToolArgumentError, match=words):
            tool.validate(bad)


def test_docstring_args_with_continuation_lines():
    summary, args = parse_docstring(add.__doc__)
    assert summary == "Add two integers." and args == {"a": "the first number.", "b": "the second number, continued."}


def test_a_parameter_without_a_type_hint_is_refused():
    def f(x):  # noqa: ANN001
        return x

    with pytest.raises(ValueError, match="type hint"):
        function_tool(f)


class Point(pydantic.BaseModel):
    x: int
    y: int


def test_pydantic_models_as_parameters_are_validated_into_instances():
    def norm1(p: Point) -> int:
        """L1 norm."""
        return abs(p.x) + abs(p.y)

    tool = function_tool(norm1)
    assert isinstance(tool.validate({"p": {"x": 1, "y": -2}})["p"], Point)
    result = Agent(Scripted([call("norm1", {"p": {"x": 3, "y": -4}})]), [tool]).run("go")
    assert tool_results(result.messages) == ["7"]


# -- the loop ----------------------------------------------------------------------------------------------------
def test_a_turn_without_calls_is_the_answer():
    result = Agent(Scripted("forty-two"), [add], instructions="be brief").run("what?")
    assert result.stop_reason is StopReason.ANSWER and result.answer == "forty-two"
    assert [m["role"] for m in result.messages] == ["system", "user", "assistant"]


def test_calls_run_and_their_results_reach_the_next_turn():
    model = Scripted([call("add", {"a": 2, "b": 3}, "c1")], "5")
    result = Agent(model, [add]).run("2+3?")
    assert result.stop_reason is StopReason.ANSWER and result.answer == "5"
    assert model.seen[1][-2]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert model.seen[1][-1] == {"role": "tool", "tool_call_id": "c1", "content": "5"}
    finished = result.finished
    assert (finished.steps, finished.tool_calls, finished.prompt_tokens, finished.completion_tokens) == (2, 1, 20, 10)


@pytest.mark.parametrize("bad_call, kind, words", [
    (call("boom", {"x": "hi"}), "exception", "RuntimeError: broken tool got hi"),
    (call("add", {"a": "two", "b": 3}), "invalid_arguments", "a: Input should be a valid integer"),
    (call("add", '{"a": 1, "b": '), "invalid_arguments", "not valid JSON"),
    (call("nope", {}), "unknown_tool", "no tool named 'nope'; the tools are: add, boom"),
])
def test_a_failing_call_is_fed_back_and_the_run_goes_on(bad_call, kind, words):
    model = Scripted([bad_call], [call("add", {"a": 1, "b": 1})], "2")
    result = Agent(model, [add, boom]).run("go")
    assert result.stop_reason is StopReason.ANSWER and result.answer == "2"
    failed = [e for e in result.events if isinstance(e, ToolResult)][0]
    assert not failed.ok and failed.error_type == kind and words in failed.output
    assert tool_results(model.seen[1]) == [failed.output] and tool_results(model.seen[2])[-1] == "2"
    # an unparseable call is still rendered in the history (as {}), so the next prompt can be built
    json.loads(model.seen[1][-2]["tool_calls"][0]["function"]["arguments"])


def test_a_hung_tool_times_out_and_the_run_goes_on():
    model = Scripted([call("slow", {"seconds": 30})], "gave up")
    started = time.monotonic()
    result = Agent(model, [function_tool(slow, timeout=0.3)]).run("go")
    assert time.monotonic() - started < 5
    assert result.stop_reason is StopReason.ANSWER
    assert "TimeoutError: slow did not finish within 0.3 s" in tool_results(result.messages)[0]


def test_an_async_tool_times_out_by_the_limits():
    async def nap(seconds: float) -> str:
        """Async sleep."""
        await asyncio.sleep(seconds)
        return "rested"

    result = Agent(Scripted([call("nap", {"seconds": 30})], [call("nap", {"seconds": 0.01})], "ok"), [nap],
                   limits=Limits(tool_timeout=0.2)).run("go")
    assert [r.ok for r in result.events if isinstance(r, ToolResult)] == [False, True]
    assert tool_results(result.messages)[1] == "rested"


def test_parallel_calls_run_concurrently_and_report_in_order():
    model = Scripted([call("slow", {"seconds": 0.5}, "a"), call("slow", {"seconds": 0.4}, "b"),
                      call("add", {"a": 1, "b": 2}, "c")], "done")
    started = time.monotonic()
    result = Agent(model, [slow, add]).run("go")
    assert time.monotonic() - started < 0.85  # one after another would take 0.9 s
    assert [m["tool_call_id"] for m in result.messages if m["role"] == "tool"] == ["a", "b", "c"]


def test_max_steps_ends_the_run():
    model = Scripted(*[[call("add", {"a": i, "b": 0})] for i in range(10)])
    result = Agent(model, [add], limits=Limits(max_steps=3)).run("go")
    assert result.stop_reason is StopReason.MAX_STEPS and result.finished.steps == 3 and result.answer is None


def test_max_tool_calls_ends_the_run_before_passing_it():
    model = Scripted([call("add", {"a": 1, "b": 1}), call("add", {"a": 2, "b": 2})],
                     [call("add", {"a": 3, "b": 3}), call("add", {"a": 4, "b": 4})])
    result = Agent(model, [add], limits=Limits(max_tool_calls=3)).run("go")
    assert result.stop_reason is StopReason.BUDGET and result.finished.tool_calls == 3
    assert "max_tool_calls (3) reached" in result.detail
    # every call is answered: the one past the limit with "not run", so the conversation can go on
    assert tool_results(result.messages) == ["2", "4", "6", "error (budget): not run: max_tool_calls (3) reached"]


def test_the_token_budget_bounds_each_turn_and_ends_the_run():
    model = Scripted(*[[call("add", {"a": i, "b": 0})] for i in range(10)], tokens=(40, 0, 10))
    result = Agent(model, [add], limits=Limits(max_total_tokens=120, max_turn_tokens=64)).run("go")
    assert result.stop_reason is StopReason.BUDGET
    # the second turn's prompt counts as at least the first's prompt + reply: 120 - 50 spent - 50 = 20 left
    assert model.max_tokens == [64, 20]
    out = Scripted(*[[call("add", {"a": i, "b": 0})] for i in range(10)], tokens=(40, 0, 10))
    assert Agent(out, [add], limits=Limits(max_output_tokens=25)).run("go").stop_reason is StopReason.BUDGET
    assert out.max_tokens == [25, 15, 5]


def test_the_wall_clock_ends_a_run_inside_a_slow_model_turn():
    started = time.monotonic()
    result = Agent(Scripted(30.0), [add], limits=Limits(max_seconds=0.3)).run("go")
    assert result.stop_reason is StopReason.TIMEOUT and time.monotonic() - started < 3


def test_the_same_call_a_third_time_is_a_loop_but_one_retry_is_not():
    same = [call("boom", {"x": "a"})]
    result = Agent(Scripted(same, same, same, "never"), [boom]).run("go")
    assert result.stop_reason is StopReason.LOOP_DETECTED and result.finished.tool_calls == 2
    assert tool_results(result.messages)[-1].startswith("error (loop_detected): not run: boom(")
    retry = Agent(Scripted(same, same, "recovered"), [boom]).run("go")
    assert retry.stop_reason is StopReason.ANSWER


def test_retries_after_error_force_a_call_after_a_failed_one_a_bounded_number_of_times():
    boom_b = call("boom", {"x": "b"})
    model = Scripted([call("boom", {"x": "a"})], [boom_b], [boom_b], "gave up")
    result = Agent(model, [add, boom], retries_after_error=2).run("go")
    assert result.stop_reason is StopReason.ANSWER and result.answer == "gave up"
    forced = {"type": "function", "function": {"name": "boom"}}  # the one tool that failed
    assert model.tool_choices == ["auto", forced, forced, "auto"]  # two retries, then the model may answer
    # several failed tools, or only an unknown one: any tool; a turn whose calls succeed: auto again
    model = Scripted([call("boom", {"x": "a"}), call("add", {"a": "x", "b": 1})], [call("nope", {})],
                     [call("add", {"a": 1, "b": 1})], "2")
    assert Agent(model, [add, boom], retries_after_error=5).run("go").answer == "2"
    assert model.tool_choices == ["auto", "required", "required", "auto"]
    # off by default, and "none" stays "none"
    model = Scripted([call("boom", {"x": "a"})], "done")
    Agent(model, [boom]).run("go")
    assert model.tool_choices == ["auto", "auto"]
    for tools, bad in (([boom], {"retries_after_error": -1}), ([], {"retries_after_error": 1}),
                       ([boom], {"retries_after_error": 1, "tool_choice": "none"})):
        with pytest.raises(ValueError, match="retries_after_error"):
            Agent(Scripted(), tools, **bad)
    # not forced on the last step, or with no tool call left (the model may still answer there)
    model = Scripted([call("boom", {"x": "a"})], "answer")
    assert Agent(model, [boom], retries_after_error=1, limits=Limits(max_steps=2)).run("go").answer == "answer"
    assert model.tool_choices == ["auto", "auto"]
    model = Scripted([call("boom", {"x": "a"})], "answer")
    assert Agent(model, [boom], retries_after_error=1, limits=Limits(max_tool_calls=1)).run("go").answer == "answer"
    assert model.tool_choices == ["auto", "auto"]


def test_the_same_call_twice_in_one_turn_runs_once_and_answers_both():
    runs = []

    def count(x: int) -> int:
        """Counts its runs."""
        runs.append(x)
        return len(runs)

    model = Scripted([call("count", {"x": 1}, "a"), call("count", {"x": 1}, "b"), call("count", {"x": 2}, "c")],
                     [call("count", {"x": 1}, "d")], "done")
    result = Agent(model, [count], limits=Limits(max_repeats=2)).run("go")
    assert runs == [1, 2, 1] and result.stop_reason is StopReason.ANSWER
    assert [(m["tool_call_id"], m["content"]) for m in result.messages if m["role"] == "tool"] == [
        ("a", "1"), ("b", "1"), ("c", "2"), ("d", "3")]
    assert result.finished.tool_calls == 3


def test_arguments_that_are_json_but_not_an_object_replay_as_empty():
    model = Scripted([call("add", "[1]")], "done")
    result = Agent(model, [add]).run("go")
    assert result.stop_reason is StopReason.ANSWER
    assert model.seen[1][-2]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert "invalid_arguments" in tool_results(model.seen[1])[0]


def test_a_long_result_of_a_repeated_call_is_in_the_prompt_once():
    from freehold.agent.loop import REPEAT_RESULT_CHARS

    def passages(q: str) -> str:
        """Long."""
        return q * (REPEAT_RESULT_CHARS + 1)

    model = Scripted([call("passages", {"q": "x"}, "a"), call("passages", {"q": "x"}, "b")], "done")
    result = Agent(model, [passages]).run("go")
    assert tool_results(result.messages) == ["(the same call is made again below: its result is there)",
                                             "x" * (REPEAT_RESULT_CHARS + 1)]
    assert [len(e.output) for e in result.events if isinstance(e, ToolResult)] == [REPEAT_RESULT_CHARS + 1] * 2


def test_a_model_error_ends_the_run_with_error():
    result = Agent(Scripted([call("add", {"a": 1, "b": 2})], ModelError("context full")), [add]).run("go")
    assert result.stop_reason is StopReason.ERROR and "context full" in result.detail
    assert result.finished.steps == 2


@pytest.mark.parametrize("raise_it", [lambda: exec("import sys; sys.exit(3)"), lambda: exec("raise KeyboardInterrupt")])
def test_a_tool_raising_system_exit_or_keyboard_interrupt_is_fed_back(raise_it):
    def quits() -> str:
        """Quits."""
        raise_it()

    async def quits_async() -> str:
        """Quits, async."""
        raise_it()

    model = Scripted([call("quits", {}), call("quits_async", {})], "still here")
    result = Agent(model, [quits, quits_async]).run("go")
    assert result.stop_reason is StopReason.ANSWER
    outputs = tool_results(result.messages)
    assert all(o.startswith("error (exception): ") for o in outputs)
    assert {o.split(": ")[1] for o in outputs} <= {"SystemExit", "KeyboardInterrupt"}


def test_deeply_nested_arguments_are_fed_back():
    result = Agent(Scripted([call("add", "[" * 100_000 + "]" * 100_000)], "ok"), [add]).run("go")
    assert result.stop_reason is StopReason.ANSWER
    assert tool_results(result.messages)[0].startswith("error (invalid_arguments): arguments are not valid JSON")


def test_client_calls_do_not_count_against_max_tool_calls():
    weather = client_tool("weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})
    model = Scripted([call("weather", {"city": "Oslo"}, "w1"), call("weather", {"city": "Rome"}, "w2")])
    result = Agent(model, [weather], limits=Limits(max_tool_calls=1)).run("go")
    assert result.stop_reason is StopReason.CLIENT_TOOLS
    assert [c.id for c in result.finished.client_calls] == ["w1", "w2"]


def test_client_tools_are_handed_back_after_the_loops_own_calls_run():
    weather = client_tool("weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})
    model = Scripted([call("add", {"a": 1, "b": 2}, "mine"), call("weather", {"city": "Oslo"}, "theirs")])
    result = Agent(model, [add, weather]).run("go")
    assert result.stop_reason is StopReason.CLIENT_TOOLS
    assert [c.id for c in result.finished.client_calls] == ["theirs"]
    assert tool_results(result.messages) == ["3"]


def test_a_tool_result_is_truncated_for_the_model():
    def big() -> str:
        """Much text."""
        return "x" * 10_000

    result = Agent(Scripted([call("big", {})], "ok"), [big], limits=Limits(max_result_chars=100)).run("go")
    assert tool_results(result.messages)[0].startswith("x" * 100 + "\n... [9900 more characters cut]")


def test_events_stream_in_order_and_the_trace_round_trips(tmp_path):
    path = tmp_path / "run.jsonl"
    seen = []
    result = Agent(Scripted([call("add", {"a": 2, "b": 2})], "four"), [add]).run("2+2", trace=path,
                                                                                 on_event=seen.append)
    assert [type(e) for e in seen] == [RunStarted, ModelTurn, ToolResult, TextDelta, ModelTurn, RunFinished]
    traced = read_trace(path)
    assert traced == result.events == [e for e in seen if not isinstance(e, TextDelta)]
    text = render(traced)
    assert "calls add" in text and "tool add ok" in text and "finished: answer after 2 step(s)" in text
    with open(path, "a") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match=":6: not a trace event"):
        read_trace(path)


def test_run_works_inside_a_running_event_loop():
    async def inside():
        return Agent(Scripted("hi"), []).run("go")

    assert asyncio.run(inside()).answer == "hi"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_steps"):
        Limits(max_steps=0)
    with pytest.raises(ValueError, match="tool_timeout"):
        Limits(tool_timeout=0)


def test_abandoned_tool_threads_do_not_block_the_caller():
    gate = threading.Event()

    def stuck() -> str:
        """Waits for ever (until the test ends)."""
        gate.wait(60)
        return "late"

    started = time.monotonic()
    result = Agent(Scripted([call("stuck", {})], "moved on"), [stuck], limits=Limits(tool_timeout=0.2)).run("go")
    gate.set()
    assert result.answer == "moved on" and time.monotonic() - started < 3
