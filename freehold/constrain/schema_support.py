"""Which JSON Schema features the grammar engine enforces. xgrammar 0.2.x accepts some keywords without
enforcing them (it logs a warning, or nothing), which would let a "valid" output break the schema; this module
finds the first such feature in a schema and rejects it with its location, so a request gets a 400 that names
the unsupported part instead of output that silently violates its schema.

Each rule below was checked against xgrammar by feeding it an instance that violates only that keyword
(tests/unit/test_constrain_compile.py keeps a few of those probes).

    not, if/then/else, dependencies, dependentRequired, dependentSchemas, contains   ignored
    uniqueItems: true                                                                  ignored
    multipleOf on a non-integer type (or a fractional multipleOf)                      ignored
    allOf with more than one subschema                                                 merged loosely
    pattern together with minLength / maxLength                                        lengths ignored
    required names that `properties` does not declare                                 ignored
    oneOf whose subschemas can match the same value                                    treated as anyOf
    $ref to anything but a local "#/..." pointer                                       not fetched
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from freehold.errors import InvalidRequestError

_IGNORED_KEYWORDS = ("not", "if", "then", "else", "dependencies", "dependentRequired", "dependentSchemas",
                     "contains", "minContains", "maxContains")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "propertyNames", "unevaluatedProperties",
                  "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def check_schema_support(schema: Any) -> None:
    """Raise InvalidRequestError naming the first feature (by JSON pointer) that the engine would not enforce."""
    for pointer, sub in _subschemas(schema, ""):
        problem = _problem(sub, schema)
        if problem is not None:
            raise InvalidRequestError(f"the JSON schema at '{pointer or '/'}' uses {problem}, which the grammar "
                                      "engine cannot enforce")


def _problem(s: dict[str, Any], root: Any) -> str | None:
    for keyword in _IGNORED_KEYWORDS:
        if keyword in s:
            return f"'{keyword}'"
    if s.get("uniqueItems") is True:
        return "'uniqueItems'"
    if "multipleOf" in s and not (s.get("type") == "integer" and _is_int(s["multipleOf"])):
        return "'multipleOf' on a non-integer value"
    if isinstance(s.get("allOf"), list) and len(s["allOf"]) > 1:
        return "'allOf' with more than one subschema"
    if "pattern" in s and ("minLength" in s or "maxLength" in s):
        return "'pattern' together with 'minLength'/'maxLength'"
    ref = s.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return f"the non-local '$ref' {ref!r}"
    undeclared = _undeclared_required(s)
    if undeclared:
        return f"'required' property {undeclared[0]!r} that 'properties' does not declare"
    if isinstance(s.get("oneOf"), list) and not _disjoint([_types(b, root) for b in s["oneOf"]]):
        return "'oneOf' whose alternatives can match the same value (only alternatives of distinct types are supported)"
    return None


def _subschemas(schema: Any, pointer: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema (dicts only; boolean schemas need no check), depth first, with its JSON pointer."""
    if not isinstance(schema, dict):
        return
    yield pointer, schema
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from _subschemas(sub, f"{pointer}/{key}/{_escape(name)}")
    for key in _SCHEMA_VALUES:
        if isinstance(schema.get(key), dict):
            yield from _subschemas(schema[key], f"{pointer}/{key}")
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield from _subschemas(sub, f"{pointer}/{key}/{i}")


def _undeclared_required(s: dict[str, Any]) -> list[str]:
    required = s.get("required")
    if not isinstance(required, list) or s.get("patternProperties"):
        return []
    declared = s.get("properties") if isinstance(s.get("properties"), dict) else {}
    return [name for name in required if name not in declared]


def _types(s: Any, root: Any, depth: int = 0) -> frozenset[str]:
    """The JSON types a subschema can match (every type when it cannot tell), following local $refs."""
    everything = frozenset(_JSON_TYPES)
    if not isinstance(s, dict) or depth > 16:
        return everything
    if isinstance(s.get("$ref"), str) and s["$ref"].startswith("#"):
        return _types(_resolve(root, s["$ref"]), root, depth + 1)
    if "const" in s:
        return frozenset([_type_of(s["const"])])
    if isinstance(s.get("enum"), list):
        return frozenset(_type_of(v) for v in s["enum"])
    declared = s.get("type")
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, list):
        return everything
    types = set(declared)
    if "number" in types:
        types.add("integer")  # 1 is both an integer and a number
    return frozenset(types)


def _disjoint(type_sets: list[frozenset[str]]) -> bool:
    seen: set[str] = set()
    for types in type_sets:
        if seen & types:
            return False
        seen |= types
    return True


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for part in ref.removeprefix("#").split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "object")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
