"""OpenAI's vector-store search `filters` on file attributes: comparisons and compound and/or.

    {"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte", "key": "author", "value": "Ada"}
    {"type": "and"|"or", "filters": [<filter>, ...]}

A comparison is true only when the file has the attribute and the values are comparable (numbers with numbers,
strings with strings, booleans only by eq/ne); `ne` is also true when the file lacks the attribute. A key that no
file in the store has is refused (InvalidRequestError naming it): it is far more often a typo than a wish for
no results.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Union

from freehold.errors import InvalidRequestError

AttributeValue = Union[str, float, int, bool]

COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gte": operator.ge, "lt": operator.lt,
    "lte": operator.le}
COMPOUNDS = ("and", "or")


@dataclass(frozen=True)
class Comparison:
    op: str
    key: str
    value: AttributeValue

    def matches(self, attributes: dict[str, AttributeValue]) -> bool:
        if self.key not in attributes:
            return self.op == "ne"
        have = attributes[self.key]
        if not _comparable(have, self.value, self.op):
            return self.op == "ne"
        return COMPARISONS[self.op](have, self.value)

    def keys(self) -> set[str]:
        return {self.key}


@dataclass(frozen=True)
class Compound:
    op: str
    filters: tuple[Filter, ...]

    def matches(self, attributes: dict[str, AttributeValue]) -> bool:
        results = (f.matches(attributes) for f in self.filters)
        return all(results) if self.op == "and" else any(results)

    def keys(self) -> set[str]:
        return set().union(*(f.keys() for f in self.filters))


Filter = Union[Comparison, Compound]


def _comparable(a: AttributeValue, b: AttributeValue, op: str) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and op in ("eq", "ne")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return True
    return isinstance(a, str) and isinstance(b, str)


def parse_filter(obj: Any, where: str = "filters") -> Filter:
    """The request's JSON -> a Filter; InvalidRequestError naming the part that is wrong."""
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"{where} must be an object", param="filters")
    kind = obj.get("type")
    if kind in COMPARISONS:
        key, value = obj.get("key"), obj.get("value")
        if not isinstance(key, str) or not key:
            raise InvalidRequestError(f"{where}.key must be a non-empty string", param="filters")
        if not isinstance(value, (str, int, float, bool)):
            raise InvalidRequestError(f"{where}.value must be a string, number or boolean", param="filters")
        return Comparison(kind, key, value)
    if kind in COMPOUNDS:
        items = obj.get("filters")
        if not isinstance(items, list) or not items:
            raise InvalidRequestError(f"{where}.filters must be a non-empty list", param="filters")
        return Compound(kind, tuple(parse_filter(f, f"{where}.filters[{i}]") for i, f in enumerate(items)))
    raise InvalidRequestError(f"{where}.type must be one of {', '.join([*COMPARISONS, *COMPOUNDS])}, got {kind!r}",
                              param="filters")


def check_known_keys(flt: Filter, known: set[str]) -> None:
    unknown = sorted(flt.keys() - known)
    if unknown:
        raise InvalidRequestError(f"filters: no file in this vector store has the attribute {unknown[0]!r}",
                                  param="filters")
