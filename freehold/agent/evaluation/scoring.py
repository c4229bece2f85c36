"""How a run is scored: does the final answer hold the expected answer, and did the run recover from a failed tool
call. Pure functions over text and trace events (no model)."""
from __future__ import annotations

import enum
import re
from typing import Iterable

from freehold.agent.events import Event, ToolResult

# A number as people write it: digits, or groups of three split by a comma, an underscore or a (narrow) no-break
# space ("35,627,190"). A plain space is not a separator: "4821 7390" is two numbers.
_NUMBER = re.compile(r"(?<![\d.])\d{1,3}(?:([,_\u00a0\u202f])\d{3})(?:\1\d{3})*(?!\d)|\d+")


class AnswerKind(enum.Enum):
    NUMBER = "number"  # an integer: found among the numbers of the answer, separators allowed
    TEXT = "text"  # a word or phrase: found in the answer, case-insensitive, not inside a longer word


def numbers_in(text: str) -> list[int]:
    """The integers written in a text, thousands separators removed: "35,627,190 and 7" -> [35627190, 7]."""
    return [int(re.sub(r"[,_\u00a0\u202f]", "", m.group(0))) for m in _NUMBER.finditer(text)]


def contains_phrase(text: str, phrase: str) -> bool:
    """`phrase` in `text`, case-insensitive, as a whole word ("ss" is in "to 'ss'" but not in "class"). Not
    casefolded: that would turn the question's own "'ß'" into "'ss'"."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


def is_correct(answer: str | None, expected: Iterable[str], kind: AnswerKind) -> bool:
    """Whether the final answer holds any of the expected answers. No answer (a run that ended without one) is
    wrong."""
    if not answer:
        return False
    if kind is AnswerKind.NUMBER:
        found = set(numbers_in(answer))
        return any(int(e) in found for e in expected)
    return any(contains_phrase(answer, e) for e in expected)


def faulted(events: Iterable[Event]) -> bool:
    """A tool call of the run failed (an exception, a timeout, invalid arguments, an unknown tool)."""
    return any(isinstance(e, ToolResult) and not e.ok for e in events)


def recovered(events: Iterable[Event]) -> bool:
    """After a failed call, a later call to the same tool succeeded: the model retried (or fixed its call) rather
    than giving up or guessing."""
    first_failure: dict[str, int] = {}  # tool -> the step of its first failed call
    for e in events:
        if not isinstance(e, ToolResult):
            continue
        if not e.ok:
            first_failure.setdefault(e.name, e.step)
        elif e.name in first_failure and e.step > first_failure[e.name]:  # a later turn: a call of the same turn
            return True                                                   # was not a reaction to the error
    return False
