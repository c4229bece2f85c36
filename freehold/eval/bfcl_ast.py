"""BFCL's AST checker for Python-language categories, reimplemented: the official one (`bfcl-eval` on PyPI) imports
every model handler it supports at import time (openai, anthropic, vllm-era pins, faiss, sentence-transformers...),
so it is not a light optional dependency. The rules below follow bfcl_eval/eval_checker/ast_eval/ast_checker.py
(v2026.3.23) for Language.PYTHON:

- simple: exactly one call; multiple: exactly one call, checked against the expected function; parallel (and
  parallel_multiple): as many calls as expected, matched in any order; irrelevance: no call at all.
- a call: the expected function name (dots written as underscores, as BFCL does for OpenAI-style tool names),
  every required parameter present, no parameter the function or the answer does not know, each value of the
  declared type (int accepted for float; one level of nested item types checked for arrays/tuples) and among
  the possible answers (strings compared case-insensitively without spaces and ",./-_*^"; dicts key by key),
  and every parameter the answer lists as mandatory (no "" among its possible values) present.

A model output is a list of calls, each {name: {param: value}}. `check` returns None when the output is right, or
the first reason it is not.
"""
from __future__ import annotations

import re
from typing import Any

_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
          "dict": dict, "any": str}
_NESTED = ("array", "tuple")

Call = dict[str, dict[str, Any]]  # {function name: arguments}


def tool_name(name: str) -> str:
    """A BFCL function name as an OpenAI tool name (^[a-zA-Z0-9_-]+$: no dots)."""
    return name.replace(".", "_")


def check(category: str, functions: list[dict], output: list[Call], answers: list[Call]) -> str | None:
    if "irrelevance" in category:
        return None if not output else f"expected no call, got {len(output)}"
    if len(output) != len(answers):
        return f"wrong number of calls: {len(output)}, expected {len(answers)}"
    if "parallel" in category:
        return _check_any_order(functions, output, answers)
    expected = next(iter(answers[0]))
    return check_call(_find(functions, expected), output[0], answers[0][expected])


def check_call(function: dict, call: Call, answer: dict[str, list]) -> str | None:
    name = tool_name(function["name"])
    if name not in call:
        return f"function {name!r} not called (got {', '.join(call) or 'nothing'})"
    args, properties = call[name], function["parameters"]["properties"]
    if not isinstance(args, dict):
        return f"arguments are not an object: {args!r}"
    for param in function["parameters"].get("required", []):
        if param not in args:
            return f"missing required parameter {param!r}"
    for param, value in args.items():
        if param not in properties or param not in answer:
            return f"unexpected parameter {param!r}"
        problem = _check_value(param, value, properties[param], answer[param])
        if problem:
            return problem
    for param, possible in answer.items():
        if param not in args and "" not in possible:
            return f"optional parameter {param!r} not provided but expected"
    return None


# ---- private ------------------------------------------------------------------------------------------------------
def _find(functions: list[dict], name: str) -> dict:
    return next(f for f in functions if f["name"] == name)


def _check_any_order(functions: list[dict], output: list[Call], answers: list[Call]) -> str | None:
    matched: set[int] = set()
    for i, answer in enumerate(answers):
        expected = next(iter(answer))
        function = _find(functions, expected)
        hit = next((j for j, call in enumerate(output)
                    if j not in matched and check_call(function, call, answer[expected]) is None), None)
        if hit is None:
            return f"no call matches expected call {i} ({expected})"
        matched.add(hit)
    return None


def _check_value(param: str, value: Any, details: dict, possible: list) -> str | None:
    declared = details["type"]
    expected = _TYPES[declared]
    nested = _TYPES[details["items"]["type"]] if declared in _NESTED and "items" in details else None
    if declared == "float" and type(value) is int:
        value = float(value)  # Python converts int to float on its own
    is_variable, problem = _check_type(param, value, possible, declared, expected, nested)
    if problem:
        return problem
    if not is_variable:
        if expected is dict:
            return _check_dict(param, value, possible)
        if expected is list and nested is dict:
            return _check_list_of_dicts(param, value, possible)
        if expected is str:
            options = [_std(p) for p in possible if type(p) is str]
            return None if _std(value) in options else _bad(param, value, possible)
        if expected is list:
            std = [_std(v) if type(v) is str else v for v in value]
            options = [[_std(x) if type(x) is str else x for x in p] for p in possible if isinstance(p, list)]
            return None if std in options else _bad(param, value, possible)
    return None if value in possible else _bad(param, value, possible)


def _check_type(param: str, value: Any, possible: list, declared: str, expected: type,
                nested: type | None) -> tuple[bool, str | None]:
    """(is the value a 'variable' -- typed like the possible answers rather than the declaration --, problem)."""
    answer_type = next((type(p) for p in possible if p != ""), None)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected and (nested is None or _nested_ok(param, value, possible, nested)):
        return is_variable, None
    if answer_type is not None and type(value) is answer_type:  # BFCL's fallback, nested failures included
        return True, None
    return False, f"wrong type for {param!r}: expected {declared}, got {type(value).__name__} ({value!r})"


def _nested_ok(param: str, value: list, possible: list, nested: type) -> bool:
    """One level deep: the items fit the item type, judged against some possible answer (as BFCL does)."""
    return any(type(option) is not list or all(
        _check_type(param, v, option, nested.__name__, nested, None)[1] is None for v in value) for option in possible)


def _check_dict(param: str, value: dict, possible: list) -> str | None:
    problem = f"no possible answer matches {param!r}"
    for option in possible:
        if option == "":
            continue
        problem = _dict_problem(value, option)
        if problem is None:
            return None
    return f"{param!r}: {problem}"


def _dict_problem(value: dict, option: dict) -> str | None:
    for key, item in value.items():
        if key not in option:
            return f"unexpected dict key {key!r}"
        std = _std(item) if type(item) is str else item
        if std not in [_std(p) if type(p) is str else p for p in option[key]]:
            return f"invalid value {item!r} for dict key {key!r}"
    missing = [key for key, options in option.items() if key not in value and "" not in options]
    return f"missing dict key {missing[0]!r}" if missing else None


def _check_list_of_dicts(param: str, value: list, possible: list) -> str | None:
    for option in possible:
        if isinstance(option, list) and len(option) == len(value) and all(
                isinstance(v, dict) and _dict_problem(v, o) is None for v, o in zip(value, option)):
            return None
    return _bad(param, value, possible)


def _std(text: str) -> str:
    """BFCL's string standardization: no spaces or ",./-_*^", lower case, single quotes as double."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _bad(param: str, value: Any, possible: list) -> str:
    return f"invalid value for {param!r}: {value!r}, expected one of {possible!r}"
