"""Running the task set: each task through `Agent` with its tools and (arithmetic and look-ups) without any, scored
by its final answer; then one row per category and mode (success, recovery after a failed call, steps, tokens, wall
time, how the runs ended) and the issue's targets checked against them.

A run never takes the evaluation down: an exception out of `Agent.run` is recorded as the stop reason "crash", and
a run that took longer than its max_seconds (plus SLACK_S) counts as hung. Both fail the first target.
"""
from __future__ import annotations

import enum
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from freehold.agent.evaluation.scoring import faulted, is_correct, recovered
from freehold.agent.evaluation.tasks import Category, Resources, Task
from freehold.agent.limits import Limits, StopReason
from freehold.agent.loop import Agent

# Small enough for a few minutes on a CPU with the default 135M model; the hanging tool outlasts tool_timeout.
DEFAULT_LIMITS = Limits(max_steps=5, max_tool_calls=10, max_turn_tokens=192, max_seconds=60.0, tool_timeout=2.0)
SLACK_S = 5.0  # a run may overrun max_seconds by the model turn or tool call in flight being given up on
CRASH = "crash"  # the stop reason of a run whose Agent.run raised
STOP_ORDER = [r.value for r in StopReason] + [CRASH]

INSTRUCTIONS_TOOLS = ("You are a careful assistant with tools. Call a tool whenever it can help: do not calculate "
                      "or guess what a tool can tell you. If a tool returns an error, read it and call the tool "
                      "again, fixed if the error says how. When you have the result, give a short final answer.")
INSTRUCTIONS_NO_TOOLS = "You are a careful assistant. Give a short final answer."


class Mode(str, enum.Enum):
    TOOLS = "tools"
    NO_TOOLS = "no_tools"


@dataclass(frozen=True)
class Outcome:
    task_id: str
    category: Category
    mode: Mode
    success: bool
    stop_reason: str  # a StopReason value, or CRASH
    steps: int
    tool_calls: int
    tokens: int
    seconds: float  # wall clock around Agent.run
    faulted: bool  # a tool call failed
    recovered: bool  # ... and a later call to that tool succeeded
    within_limits: bool  # ended with a stop reason within max_seconds + SLACK_S
    answer: str | None
    detail: str
    tool_choice: str = "auto"  # of the first turn (later turns are "auto"): "required" makes it call a tool
    retries_after_error: int = 0  # Agent(retries_after_error=...): forced calls after a failed one

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task_id, "category": self.category.value, "mode": self.mode.value,
                "success": self.success, "stop_reason": self.stop_reason, "steps": self.steps,
                "tool_calls": self.tool_calls, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "faulted": self.faulted, "recovered": self.recovered, "within_limits": self.within_limits,
                "answer": (self.answer or "")[:300], "detail": self.detail, "tool_choice": self.tool_choice,
                "retries_after_error": self.retries_after_error}


def run_task(model: Any, task: Task, mode: Mode, resources: Resources = Resources(),
             limits: Limits = DEFAULT_LIMITS, trace: Path | None = None, tool_choice: str = "auto",
             retries_after_error: int = 0) -> Outcome:
    """One run of a task (a fresh set of its tools with Mode.TOOLS, none without), scored."""
    tools = task.make_tools(resources) if mode is Mode.TOOLS else []
    tool_choice = tool_choice if tools else "auto"
    retries_after_error = retries_after_error if tools else 0
    instructions = INSTRUCTIONS_TOOLS if tools else INSTRUCTIONS_NO_TOOLS
    if trace is not None and trace.exists():
        trace.unlink()  # a rerun's trace replaces the last one (the writer appends)
    started = time.monotonic()
    try:
        agent = Agent(model, tools, instructions=instructions, limits=limits, tool_choice=tool_choice,
                      retries_after_error=retries_after_error)
        result = agent.run(task.prompt, trace=trace)
    except Exception as exc:  # noqa: BLE001  the evaluation records a crash instead of ending with it
        seconds = time.monotonic() - started
        return Outcome(task.id, task.category, mode, False, CRASH, 0, 0, 0, seconds, False, False, False, None,
                       f"{type(exc).__name__}: {exc}", tool_choice, retries_after_error)
    seconds = time.monotonic() - started
    done = result.finished
    return Outcome(task.id, task.category, mode, is_correct(result.answer, task.answers, task.kind),
                   result.stop_reason.value, done.steps, done.tool_calls, done.total_tokens, seconds,
                   faulted(result.events), recovered(result.events), seconds <= limits.max_seconds + SLACK_S,
                   result.answer, result.detail, tool_choice, retries_after_error)


def parse_choices(text: str, kind: type[enum.Enum], option: str) -> list:
    """"a,b" -> [kind("a"), kind("b")]; ValueError names the unknown ones and the choices."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    choices = [e.value for e in kind]  # type: ignore[attr-defined]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise ValueError(f"{option}: one or more of {', '.join(choices)}, got {text!r}")
    return [kind(n) for n in dict.fromkeys(names)]


def runs_of(tasks: list[Task], modes: list[Mode]) -> list[tuple[Task, Mode]]:
    """(task, mode) pairs to run: every task in each mode, except fault tasks without tools (no tool, no fault)."""
    return [(t, m) for m in modes for t in tasks if m is Mode.TOOLS or t.compare_without_tools]


def evaluate(model: Any, tasks: list[Task], modes: list[Mode], resources: Resources = Resources(),
             limits: Limits = DEFAULT_LIMITS, trace_dir: Path | None = None,
             progress: Callable[[int, int, Outcome], None] | None = None, tool_choice: str = "auto",
             retries_after_error: int = 0) -> list[Outcome]:
    runs = runs_of(tasks, modes)
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for i, (task, mode) in enumerate(runs, 1):
        trace = trace_dir / f"{task.id}-{mode.value}.jsonl" if trace_dir is not None else None
        outcomes.append(run_task(model, task, mode, resources, limits, trace, tool_choice, retries_after_error))
        if progress is not None:
            progress(i, len(runs), outcomes[-1])
    return outcomes


# -- the report ------------------------------------------------------------------------------------------------------
HEADERS = ["category", "mode", "runs", "success", "recovered", "steps", "tool calls", "tokens", "wall s", "ended"]


@dataclass(frozen=True)
class Summary:
    category: Category
    mode: Mode
    runs: int
    success_rate: float
    num_faulted: int  # runs with a failed tool call
    num_recovered: int  # ... of which a later call to the same tool succeeded
    mean_steps: float
    mean_tool_calls: float
    mean_tokens: float
    mean_seconds: float
    stop_reasons: dict[str, int]
    tool_choice: str = "auto"
    retries_after_error: int = 0

    def row(self) -> list:
        recovery = f"{self.num_recovered}/{self.num_faulted}" if self.mode is Mode.TOOLS else "-"
        settings = ([f"{self.tool_choice} 1st call"] if self.tool_choice != "auto" else []) + \
            ([f"{self.retries_after_error} retry after error"] if self.retries_after_error else [])
        mode = f"{self.mode.value} ({', '.join(settings)})" if settings else self.mode.value
        return [self.category.value, mode, self.runs, round(self.success_rate, 3), recovery,
                round(self.mean_steps, 2), round(self.mean_tool_calls, 2), round(self.mean_tokens),
                round(self.mean_seconds, 2), ", ".join(f"{k} {v}" for k, v in self.stop_reasons.items())]


def summarize(outcomes: list[Outcome]) -> list[Summary]:
    """One Summary per (category, mode) present, in category then mode order."""
    summaries = []
    for category in Category:
        for mode in Mode:
            group = [o for o in outcomes if o.category is category and o.mode is mode]
            if group:
                summaries.append(_summary(category, mode, group))
    return summaries


def _summary(category: Category, mode: Mode, group: list[Outcome]) -> Summary:
    counts = Counter(o.stop_reason for o in group)
    return Summary(category, mode, len(group), _mean([o.success for o in group]),
                   sum(o.faulted for o in group), sum(o.recovered for o in group),
                   _mean([o.steps for o in group]), _mean([o.tool_calls for o in group]),
                   _mean([o.tokens for o in group]), _mean([o.seconds for o in group]),
                   {r: counts[r] for r in STOP_ORDER if counts[r]}, group[0].tool_choice,
                   group[0].retries_after_error)


def _mean(values: list[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0


# -- the targets -----------------------------------------------------------------------------------------------------
RECOVERY_TARGET = 0.8
TOOL_GAIN_TARGET = 2.0


@dataclass(frozen=True)
class Target:
    name: str
    met: bool
    value: str  # the measured numbers, in words


def check_targets(outcomes: list[Outcome]) -> list[Target]:
    """The issue's targets: every run ends with a stop reason within its limits; fault tasks recover (a later call
    succeeds after a failed one) in >= 80% of the runs where a call failed; success with tools >= 2x without on
    arithmetic and look-ups."""
    bad = [o for o in outcomes if o.stop_reason == CRASH or not o.within_limits]
    targets = [Target("every run ends with a stop reason within its limits", not bad,
                      f"{len(outcomes) - len(bad)}/{len(outcomes)} runs"
                      + (f"; not: {', '.join(f'{o.task_id} ({o.mode.value})' for o in bad[:5])}" if bad else ""))]
    faults = [o for o in outcomes if o.category is Category.FAULT and o.mode is Mode.TOOLS]
    if faults:
        hit = [o for o in faults if o.faulted]
        rate = _mean([o.recovered for o in hit])
        targets.append(Target(f"fault tasks recover in >= {RECOVERY_TARGET:.0%} of runs", bool(hit)
                              and rate >= RECOVERY_TARGET,
                              f"{sum(o.recovered for o in hit)}/{len(hit)} runs with a failed call recovered "
                              f"({rate:.0%}); the fault was reached in {len(hit)}/{len(faults)} runs"))
    for category in (Category.ARITHMETIC, Category.LOOKUP):
        with_tools = [o.success for o in outcomes if o.category is category and o.mode is Mode.TOOLS]
        without = [o.success for o in outcomes if o.category is category and o.mode is Mode.NO_TOOLS]
        if with_tools and without:
            a, b = _mean(with_tools), _mean(without)
            met = a > 0 and a >= TOOL_GAIN_TARGET * b
            ratio = f"{a / b:.2f}x" if b else ("inf" if a else "n/a")
            targets.append(Target(f"{category.value}: success with tools >= {TOOL_GAIN_TARGET:g}x without", met,
                                  f"{a:.0%} with tools vs {b:.0%} without ({ratio})"))
    return targets
