"""`freehold eval agent` without a model: answer matching, recovery detection, the task set's answers (checked
against Python's own arithmetic, calendar and pydoc text), the faulty tools' behaviour through the real loop with a
scripted model, the report rows and targets, and the CLI parser."""
from __future__ import annotations

import ast
import asyncio
import calendar
import json
import operator
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from freehold.agent.evaluation import tasks as task_set
from freehold.agent.evaluation.faults import PACKAGES, misleading_weekday
from freehold.agent.evaluation.pydoc_store import pydoc_topics
from freehold.agent.evaluation.run import (CRASH, DEFAULT_LIMITS, Mode, Outcome, check_targets, evaluate,
                                           parse_choices, run_task, runs_of, summarize)
from freehold.agent.evaluation.scoring import (AnswerKind, contains_phrase, faulted, is_correct, numbers_in,
                                               recovered)
from freehold.agent.evaluation.tasks import Category, Resources, Task, all_tasks, select
from freehold.agent.events import CallRecord, ToolResult
from freehold.agent.functions import ToolArgumentError
from freehold.agent.limits import Limits
from freehold.agent.models import TurnResult
from freehold.tools.parse import ContentDelta


def call(name: str, arguments: dict, call_id: str) -> CallRecord:
    return CallRecord(call_id, name, json.dumps(arguments))


class Scripted:
    """A ChatModel that replays turns (a str answers, a list of CallRecord calls tools, an exception is raised) and
    keeps the tools it was offered each turn."""

    name = "scripted"

    def __init__(self, *turns: Any):
        self.turns = list(turns)
        self.offered: list[list[str]] = []
        self.choices: list[str] = []

    async def turn(self, messages, tools, *, max_tokens, tool_choice="auto", parallel_tool_calls=True):
        self.offered.append([t["function"]["name"] for t in tools])
        self.choices.append(tool_choice)
        script = self.turns.pop(0) if self.turns else "done"
        if isinstance(script, Exception):
            raise script
        if isinstance(script, str):
            yield ContentDelta(script)
            yield TurnResult(script, [], "stop", 10, 0, 5)
        else:
            yield TurnResult(None, list(script), "tool_calls", 10, 0, 5)


def the_task(task_id: str) -> Task:
    return next(t for t in all_tasks(hang_seconds=5.0) if t.id == task_id)


def result(step: int, name: str, ok: bool) -> ToolResult:
    return ToolResult(0.0, step, f"c{step}", name, "{}", ok, "out", None if ok else "exception", 0.0)


# -- scoring -------------------------------------------------------------------------------------------------------
def test_numbers_are_read_with_thousands_separators_but_not_across_spaces():
    assert numbers_in("35,627,190 and 7; 1_234_567 or 12\u202f345") == [35627190, 7, 1234567, 12345]
    assert numbers_in("4821 7390") == [4821, 7390]
    assert numbers_in("1,23") == [1, 23]  # not a thousands group


@pytest.mark.parametrize("answer, expected, kind, correct", [
    ("7339 * 5740 = 42,125,860.", "42125860", AnswerKind.NUMBER, True),
    ("The result is 42125860", "42125860", AnswerKind.NUMBER, True),
    ("about 421258600", "42125860", AnswerKind.NUMBER, False),
    ("It is 2125860", "42125860", AnswerKind.NUMBER, False),
    ("It becomes \"SS\".", "ss", AnswerKind.TEXT, True),
    ("a class of its own", "ss", AnswerKind.TEXT, False),
    ("the letter 'ß' is equivalent to 'sß'", "ss", AnswerKind.TEXT, False),  # the question's ß is not "ss"
    ("it is breakpoint().", "breakpoint()", AnswerKind.TEXT, True),
    ("use pdb.set_trace() to set a breakpoint", "breakpoint()", AnswerKind.TEXT, False),
    ("it is transformed to _Ham__spam", "_Ham__spam", AnswerKind.TEXT, True),
    ("see section 3.131", "3.13", AnswerKind.TEXT, False),
    ("section 3.13.", "3.13", AnswerKind.TEXT, True),
    ("", "ss", AnswerKind.TEXT, False),
    (None, "1", AnswerKind.NUMBER, False),
])
def test_answers_match_whole_numbers_and_whole_words(answer, expected, kind, correct):
    assert is_correct(answer, (expected,), kind) is correct


def test_recovery_is_a_later_turns_success_with_the_same_tool():
    assert recovered([result(1, "calc", False), result(2, "calc", True)])
    assert not recovered([result(1, "calc", False), result(1, "calc", True)])  # same turn: not a retry
    assert not recovered([result(1, "calc", False), result(2, "other", True)])
    assert not recovered([result(1, "calc", True)]) and not faulted([result(1, "calc", True)])
    assert faulted([result(1, "calc", False)])


# -- the task set ----------------------------------------------------------------------------------------------------
def _arith(node: ast.AST) -> int:
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    assert isinstance(node, ast.BinOp) and type(node.op) in ops, ast.dump(node)
    return ops[type(node.op)](_arith(node.left), _arith(node.right))


def test_the_task_set_has_fifty_tasks_with_unique_ids():
    tasks = all_tasks()
    assert len(tasks) == 50 and len({t.id for t in tasks}) == 50
    assert {c: sum(t.category is c for t in tasks) for c in Category} == {
        Category.ARITHMETIC: 20, Category.LOOKUP: 15, Category.FAULT: 15}


def test_arithmetic_answers_are_right_and_the_set_is_fixed():
    tasks = task_set.arithmetic_tasks()
    assert [t.prompt for t in tasks] == [t.prompt for t in task_set.arithmetic_tasks()]
    flaky = [t for t in task_set.fault_tasks() if t.id.startswith("fault-flaky")]
    for t in tasks + flaky:
        expression = t.prompt.removeprefix("What is ").removesuffix("?")
        assert t.answers == (str(_arith(ast.parse(expression, mode="eval").body)),)
        assert len(t.answers[0]) >= 7  # beyond mental arithmetic for a small model


def test_lookup_answers_are_in_their_pydoc_topic():
    topics = pydoc_topics()
    for t in task_set.lookup_tasks():
        assert t.source in topics, t.id
        assert contains_phrase(topics[t.source], t.answers[0]), (t.id, t.answers)


def test_fault_answers_come_from_the_calendar_and_the_package_table():
    for t in task_set.fault_tasks():
        if t.id.startswith("fault-schema"):
            year, month, day = map(int, t.source.split("-"))
            assert t.answers == (calendar.day_name[calendar.weekday(year, month, day)],)
            assert f"{day} {calendar.month_name[month]} {year}" in t.prompt
        elif t.id.startswith("fault-hang"):
            assert t.answers == (PACKAGES[t.source],) and t.source in t.prompt


def test_select_takes_the_first_n_of_each_category_and_limit_keeps_every_fault_kind():
    chosen = select(all_tasks(), [Category.FAULT, Category.ARITHMETIC], limit=3)
    assert [t.id for t in chosen] == ["fault-flaky-1", "fault-hang-1", "fault-schema-1", "arithmetic-01",
                                      "arithmetic-02", "arithmetic-03"]


# -- the faulty tools through the loop -------------------------------------------------------------------------------
def test_the_flaky_calculator_fails_once_then_works():
    task = the_task("fault-flaky-1")
    model = Scripted([call("calculator", {"expression": "5317 * 8642"}, "a")],
                     [call("calculator", {"expression": "5317 * 8642"}, "b")], "It is 45,949,514.")
    outcome = run_task(model, task, Mode.TOOLS)
    assert outcome.success and outcome.faulted and outcome.recovered and outcome.stop_reason == "answer"
    assert model.offered[0] == ["calculator"]


def test_the_hanging_tool_times_out_once_then_answers():
    task = the_task("fault-hang-2")
    ask = [call("track_package", {"tracking_number": "KX-58201"}, "a")]
    started = time.monotonic()
    outcome = run_task(Scripted(ask, ask, "It is in Porto."), task, Mode.TOOLS,
                       limits=replace(DEFAULT_LIMITS, tool_timeout=0.2))
    assert time.monotonic() - started < 3  # the 5 s hang was given up on
    assert outcome.success and outcome.faulted and outcome.recovered and outcome.within_limits


def test_a_model_that_gives_up_after_the_hang_is_not_recovered():
    outcome = run_task(Scripted([call("track_package", {"tracking_number": "KX-58201"}, "a")], "Lisbon"),
                       the_task("fault-hang-2"), Mode.TOOLS, limits=replace(DEFAULT_LIMITS, tool_timeout=0.2))
    assert outcome.faulted and not outcome.recovered and not outcome.success


def test_the_weekday_schema_misleads_and_the_error_says_the_right_format():
    tool = misleading_weekday()
    assert "DD/MM/YYYY" in tool.parameters["properties"]["date"]["description"]
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        tool.function(date="14/03/2031")
    assert tool.function(date="2031-03-14") == "2031-03-14 is a Friday."
    with pytest.raises(ToolArgumentError):
        tool.validate({"day": "2031-03-14"})
    model = Scripted([call("weekday", {"date": "14/03/2031"}, "a")], [call("weekday", {"date": "2031-03-14"}, "b")],
                     "Friday")
    outcome = run_task(model, the_task("fault-schema-1"), Mode.TOOLS)
    assert outcome.success and outcome.recovered


def test_without_tools_nothing_is_offered_and_fault_tasks_are_not_run():
    model = Scripted("42125860")
    outcome = run_task(model, the_task("arithmetic-01"), Mode.NO_TOOLS)
    assert model.offered == [[]] and outcome.success and not outcome.faulted
    pairs = runs_of(all_tasks(), [Mode.TOOLS, Mode.NO_TOOLS])
    assert len(pairs) == 50 + 35 and all(t.category is not Category.FAULT for t, m in pairs if m is Mode.NO_TOOLS)


def test_lookup_tasks_offer_file_search_over_the_given_stores():
    hit = SimpleNamespace(filename="string-methods.txt", score=0.9, text="equivalent to \"ss\"")
    manager = SimpleNamespace(get=lambda store_id: None,
                              search=lambda store_id, query, max_num_results: SimpleNamespace(hits=[hit]))
    model = Scripted([call("file_search", {"query": "casefold"}, "a")], "It is ss.")
    outcome = run_task(model, the_task("lookup-01"), Mode.TOOLS, Resources(manager, ("vs_1",)))
    assert model.offered[0] == ["file_search"] and outcome.success and outcome.tool_calls == 1
    with pytest.raises(ValueError, match="pydoc vector store"):
        the_task("lookup-01").make_tools(Resources())


def test_a_crashing_run_is_recorded_and_fails_the_first_target(tmp_path):
    outcomes = evaluate(Scripted(RuntimeError("engine on fire")), [the_task("arithmetic-01")], [Mode.TOOLS],
                        trace_dir=tmp_path)
    assert outcomes[0].stop_reason == CRASH and "engine on fire" in outcomes[0].detail
    assert not check_targets(outcomes)[0].met


def test_evaluate_runs_each_pair_and_writes_a_trace_per_run(tmp_path):
    seen = []
    outcomes = evaluate(Scripted("1", "2"), [the_task("arithmetic-01")], [Mode.TOOLS, Mode.NO_TOOLS],
                        trace_dir=tmp_path, progress=lambda i, n, o: seen.append((i, n, o.mode)))
    assert seen == [(1, 2, Mode.TOOLS), (2, 2, Mode.NO_TOOLS)] and len(outcomes) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arithmetic-01-no_tools.jsonl", "arithmetic-01-tools.jsonl"]


def test_a_run_past_max_seconds_is_within_limits_by_its_stop_reason():
    class Slow(Scripted):
        async def turn(self, messages, tools, **kwargs):
            await asyncio.sleep(5)
            yield TurnResult("late", [], "stop", 1, 0, 1)

    outcome = run_task(Slow(), the_task("arithmetic-01"), Mode.TOOLS, limits=Limits(max_seconds=0.2))
    assert outcome.stop_reason == "timeout" and outcome.within_limits and outcome.seconds < 2


# -- the report ------------------------------------------------------------------------------------------------------
def outcome(category: Category, mode: Mode, success: bool, stop: str = "answer", *, faulted: bool = False,
            recovered: bool = False, within: bool = True) -> Outcome:
    return Outcome("t", category, mode, success, stop, 2, 1, 100, 1.5, faulted, recovered, within, "a", "")


def test_summaries_and_targets():
    a, lk, f = Category.ARITHMETIC, Category.LOOKUP, Category.FAULT
    outcomes = ([outcome(a, Mode.TOOLS, True)] * 3 + [outcome(a, Mode.TOOLS, False, "max_steps")]
                + [outcome(a, Mode.NO_TOOLS, True)] + [outcome(a, Mode.NO_TOOLS, False)] * 3
                + [outcome(lk, Mode.TOOLS, False)] * 2 + [outcome(lk, Mode.NO_TOOLS, False)] * 2
                + [outcome(f, Mode.TOOLS, True, faulted=True, recovered=True)] * 4
                + [outcome(f, Mode.TOOLS, False, faulted=True)] + [outcome(f, Mode.TOOLS, False)])
    rows = [s.row() for s in summarize(outcomes)]
    assert rows[0] == ["arithmetic", "tools", 4, 0.75, "0/0", 2.0, 1.0, 100, 1.5, "answer 3, max_steps 1"]
    assert rows[1][:5] == ["arithmetic", "no_tools", 4, 0.25, "-"]
    assert rows[-1][:5] == ["fault", "tools", 6, round(4 / 6, 3), "4/5"]
    targets = {t.name.split(":")[0]: t for t in check_targets(outcomes)}
    assert targets["every run ends with a stop reason within its limits"].met
    assert targets["fault tasks recover in >= 80% of runs"].met  # 4 of the 5 runs that reached the fault
    assert targets["arithmetic"].met and "3.00x" in targets["arithmetic"].value
    assert not targets["lookup"].met  # nothing succeeded with tools
    hung = check_targets([outcome(a, Mode.TOOLS, True, within=False)])[0]
    assert not hung.met and "0/1" in hung.value


def test_a_required_first_call_is_asked_for_with_tools_only_and_labelled():
    model = Scripted([call("calculator", {"expression": "7339 * 5740"}, "a")], "42125860", "0")
    tools_run = run_task(model, the_task("arithmetic-01"), Mode.TOOLS, tool_choice="required")
    plain_run = run_task(model, the_task("arithmetic-01"), Mode.NO_TOOLS, tool_choice="required")
    assert model.choices == ["required", "auto", "auto"] and tools_run.success and not plain_run.success
    assert [s.row()[1] for s in summarize([tools_run, plain_run])] == ["tools (required 1st call)", "no_tools"]


def test_choices_are_parsed_and_unknown_ones_named():
    assert parse_choices("fault, lookup,fault", Category, "--categories") == [Category.FAULT, Category.LOOKUP]
    with pytest.raises(ValueError, match="--modes: one or more of tools, no_tools, got 'tool'"):
        parse_choices("tool", Mode, "--modes")


# -- the command line ------------------------------------------------------------------------------------------------
def test_the_cli_parses_eval_agent():
    from freehold.cli import build_parser
    args = build_parser().parse_args(["eval", "agent", "--limit", "2", "--categories", "arithmetic,fault",
                                      "--trace", "traces", "--modes", "tools"])
    assert (args.command, args.eval_command, args.limit, args.categories, str(args.trace)) == (
        "eval", "agent", 2, "arithmetic,fault", "traces")
    defaults = build_parser().parse_args(["eval", "agent"])
    assert defaults.limit is None and defaults.model is None and str(defaults.out) == "bench-results"
