"""The task set of `freehold eval agent`, shipped in code: 20 arithmetic tasks (generated from a fixed seed), 15
look-ups in the Python reference (pydoc topics) and 15 fault tasks (5 each of a flaky, a hanging and a misleadingly
documented tool). Every answer is checkable: an exact integer, a phrase quoted from one pydoc topic, a city from
the fault tool's table, or a weekday from the calendar.

A task names the tools it is offered (`make_tools`, called once per run so that a faulty tool starts fresh); the
look-up tasks need the pydoc store (`Resources`), built once per evaluation (pydoc_store.py).
"""
from __future__ import annotations

import datetime
import enum
import random
from dataclasses import dataclass
from typing import Any, Callable

from freehold.agent.builtin.calculator import calculator
from freehold.agent.evaluation.faults import PACKAGES, flaky_calculator, hanging_tracker, misleading_weekday
from freehold.agent.evaluation.scoring import AnswerKind
from freehold.agent.functions import FunctionTool, function_tool

ARITHMETIC_SEED = 20260
HANG_SECONDS = 10.0  # the hanging tool's first call; past any tool_timeout the evaluation uses


class Category(str, enum.Enum):
    ARITHMETIC = "arithmetic"
    LOOKUP = "lookup"
    FAULT = "fault"


@dataclass(frozen=True)
class Resources:
    """What some tools need, made once per evaluation: the vector store of the pydoc topics."""

    manager: Any = None  # freehold.retrieval.StoreManager (None when no look-up task runs)
    vector_store_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    id: str
    category: Category
    prompt: str
    answers: tuple[str, ...]  # any one of them in the final answer is a success
    kind: AnswerKind
    make_tools: Callable[[Resources], list[FunctionTool]]
    source: str = ""  # where the answer comes from (the pydoc topic, the expression, ...)

    @property
    def compare_without_tools(self) -> bool:
        """Run without tools too? Not for fault tasks: without the faulty tool there is no fault."""
        return self.category is not Category.FAULT


def _calculator_tools(_: Resources) -> list[FunctionTool]:
    return [function_tool(calculator)]


def _file_search_tools(resources: Resources) -> list[FunctionTool]:
    from freehold.agent.builtin.file_search import file_search_tool
    if resources.manager is None:
        raise ValueError("look-up tasks need the pydoc vector store (Resources.manager)")
    return [file_search_tool(resources.manager, list(resources.vector_store_ids), max_num_results=3)]


# -- arithmetic ----------------------------------------------------------------------------------------------------
def _expressions(rng: random.Random) -> list[str]:
    """8 products of 4-digit numbers, 4 of a 3-digit by a 5-digit number, 4 sums of three 6-digit numbers and 4
    two-step expressions: beyond a small model's mental arithmetic, one calculator call each."""
    def n(digits: int) -> int:
        return rng.randrange(10 ** (digits - 1), 10 ** digits)

    products = [f"{n(4)} * {n(4)}" for _ in range(8)] + [f"{n(3)} * {n(5)}" for _ in range(4)]
    sums = [f"{n(6)} + {n(6)} + {n(6)}" for _ in range(4)]
    steps = [f"({n(4)} + {n(4)}) * {n(3)}" for _ in range(2)] + [f"{n(4)} * {n(3)} - {n(5)}" for _ in range(2)]
    return products + sums + steps


def arithmetic_tasks(seed: int = ARITHMETIC_SEED) -> list[Task]:
    tasks = []
    for i, expression in enumerate(_expressions(random.Random(seed)), 1):
        value = calculator(expression)
        tasks.append(Task(f"arithmetic-{i:02d}", Category.ARITHMETIC, f"What is {expression}?", (value,),
                          AnswerKind.NUMBER, _calculator_tools, expression))
    return tasks


# -- look-ups in the Python reference ------------------------------------------------------------------------------
# (question, answer, pydoc topic holding the answer). Facts stated once in the reference, answered by a short phrase.
LOOKUPS: list[tuple[str, str, str]] = [
    ("According to the documentation of str.casefold(), the German lowercase letter 'ß' is equivalent to what "
     "string?", "ss", "string-methods"),
    ("In which section of the Unicode Standard is the casefolding algorithm used by str.casefold() described?",
     "3.13", "string-methods"),
    ("Which PEP is cited for the relaxed decorator grammar of Python 3.9?", "614", "compound"),
    ("Which built-in function, new in Python 3.7, can be used instead of \"import pdb; pdb.set_trace()\"?",
     "breakpoint()", "debugger"),  # with the parentheses: "set a breakpoint" does not name the function
    ("Which special method is called by bytes() to compute a byte-string representation of an object?",
     "__bytes__", "customization"),
    ("What is the default fill character of str.center()?", "space", "string-methods"),
    ("What model of error handling does Python use, according to the reference on exceptions?", "termination",
     "exceptions"),
    ("Inside a class named Ham, what is the private identifier __spam transformed to?", "_Ham__spam",
     "atom-identifiers"),
    ("A right shift of an integer by n bits is defined as what operation by pow(2, n)?", "floor division",
     "shifting"),
    ("Which built-in function returns code objects?", "compile", "bltin-code-objects"),
    ("Through which attribute can the code object of a function object be extracted?", "__code__",
     "bltin-code-objects"),
    ("Which method, if a subclass of dict defines it, does d[key] call when the key is not present?", "__missing__",
     "typesmapping"),
    ("When a private name is mangled, above how many characters may the transformed name be truncated?", "255",
     "atom-identifiers"),
    ("What is the only limit on the length of integer literals?", "memory", "integers"),
    ("Before Python 3.8, which statement was illegal in the finally clause of a try statement?", "continue", "try"),
]


def lookup_tasks() -> list[Task]:
    return [Task(f"lookup-{i:02d}", Category.LOOKUP, f"Look it up in the Python documentation: {question}",
                 (answer,), AnswerKind.TEXT, _file_search_tools, topic)
            for i, (question, answer, topic) in enumerate(LOOKUPS, 1)]


# -- faults ----------------------------------------------------------------------------------------------------------
FLAKY_EXPRESSIONS = ["5317 * 8642", "7904 * 2561", "63018 * 479", "(8123 + 4576) * 397", "9481 * 6037"]
WEEKDAY_DATES = [datetime.date(2031, 3, 14), datetime.date(2033, 7, 2), datetime.date(2030, 11, 25),
                 datetime.date(2034, 1, 9), datetime.date(2032, 9, 30)]


def fault_tasks(hang_seconds: float = HANG_SECONDS) -> list[Task]:
    flaky = [Task(f"fault-flaky-{i}", Category.FAULT, f"What is {expression}?", (calculator(expression),),
                  AnswerKind.NUMBER, lambda _: [flaky_calculator()], expression)
             for i, expression in enumerate(FLAKY_EXPRESSIONS, 1)]
    hanging = [Task(f"fault-hang-{i}", Category.FAULT, f"Where is package {number} now?", (city,), AnswerKind.TEXT,
                    lambda _: [hanging_tracker(hang_seconds)], number)
               for i, (number, city) in enumerate(PACKAGES.items(), 1)]
    misleading = [Task(f"fault-schema-{i}", Category.FAULT,
                       f"What day of the week is {day.day} {day.strftime('%B')} {day.year}?", (day.strftime("%A"),),
                       AnswerKind.TEXT, lambda _: [misleading_weekday()], day.isoformat())
                  for i, day in enumerate(WEEKDAY_DATES, 1)]
    return [task for trio in zip(flaky, hanging, misleading) for task in trio]  # so --limit keeps every kind


def all_tasks(hang_seconds: float = HANG_SECONDS) -> list[Task]:
    return arithmetic_tasks() + lookup_tasks() + fault_tasks(hang_seconds)


def select(tasks: list[Task], categories: list[Category] | None = None, limit: int | None = None) -> list[Task]:
    """The tasks of the given categories (all when None), the first `limit` of each."""
    chosen = []
    for category in categories or list(Category):
        of_category = [t for t in tasks if t.category is category]
        chosen += of_category[:limit] if limit is not None else of_category
    return chosen
