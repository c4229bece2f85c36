"""The faulty tools of the fault tasks. Each factory returns a fresh tool (its own call count) for one run:

- `flaky_calculator`: the calculator, but its first call fails with "temporarily unavailable, try again";
  the same call again works.
- `hanging_tracker`: a package tracker whose first call hangs past the tool timeout; the same call again answers.
- `misleading_weekday`: a weekday tool whose schema says DD/MM/YYYY while it accepts only YYYY-MM-DD; the error says
  the right format.

What a recovering model does: reads the error, calls again (fixed where the error says how), then answers.
"""
from __future__ import annotations

import datetime
import re
import threading
from typing import Annotated

import pydantic

from freehold.agent.builtin.calculator import Expression, calculator
from freehold.agent.functions import FunctionTool, function_tool

# Fictional packages (a model cannot know where they are): tracking number -> depot city.
PACKAGES = {"KX-30417": "Rotterdam", "KX-58201": "Porto", "KX-71946": "Tampere", "KX-24863": "Gdansk",
            "KX-96352": "Bergen"}
# The tracker's number format, in its schema (as a real tracker's API would declare it).
TrackingNumber = Annotated[str, pydantic.Field(pattern=r"^[A-Z]{2}-[0-9]{5}$")]
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ServiceUnavailableError(RuntimeError):
    """The flaky tool's first answer."""


class _CallCounter:
    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        """1 for the first call, 2 for the second, ..."""
        with self._lock:
            self._count += 1
            return self._count


def flaky_calculator() -> FunctionTool:
    """`calculator` whose first call raises ServiceUnavailableError."""
    calls = _CallCounter()

    def flaky(expression: Expression) -> str:
        if calls.next() == 1:
            raise ServiceUnavailableError("the calculator service is temporarily unavailable, try again")
        return calculator(expression)

    base = function_tool(calculator)
    return function_tool(flaky, name="calculator", description=base.description)


def hanging_tracker(hang_seconds: float) -> FunctionTool:
    """`track_package` whose first call blocks for hang_seconds (set it past the tool timeout): the loop gives up on
    it with a timeout error and the abandoned thread ends on its own later."""
    calls = _CallCounter()

    def track_package(tracking_number: TrackingNumber) -> str:
        """Where a package is now.

        Args:
            tracking_number: the package's tracking number, as the user wrote it.
        """
        if calls.next() == 1:
            threading.Event().wait(hang_seconds)
            return "(too late: the caller has given up on this call)"
        number = tracking_number.strip().upper()
        if number not in PACKAGES:
            raise KeyError(f"no package with tracking number {tracking_number!r}")
        return f"Package {number} is at the {PACKAGES[number]} depot."

    return function_tool(track_package)


def misleading_weekday() -> FunctionTool:
    """`weekday` whose parameter description asks for DD/MM/YYYY while the function accepts only YYYY-MM-DD (its
    error message says so)."""

    def weekday(date: str) -> str:
        """The day of the week of a date.

        Args:
            date: the date as DD/MM/YYYY, e.g. "25/12/2030".
        """
        text = date.strip()
        if not _ISO_DATE.match(text):
            raise ValueError(f"date must be written year first as YYYY-MM-DD, e.g. 2030-12-25; got {date!r}")
        try:
            day = datetime.date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a real date (YYYY-MM-DD)") from None
        return f"{text} is a {day.strftime('%A')}."

    return function_tool(weekday)
