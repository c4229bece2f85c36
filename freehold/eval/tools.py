"""`freehold eval tools`: function calling on BFCL's AST categories, constrained vs unconstrained + parse.

Each item of a category (a `BFCL_v*_CATEGORY.json` file, JSON lines, with the answers in possible_answer/) is one
chat turn offering that item's functions as OpenAI tools, decoded twice, greedy:

- constrained: `LLM.chat(..., tools=..., tool_choice=...)`, the grammar allows only well-formed calls;
- unconstrained + parse: the same prompt (the same tool rendering), free generation, then `parse_tool_calls` on
  the text, which is what a server without a grammar does (vLLM's and llama.cpp's tool parsers).

tool_choice is "required" for the categories whose answer is a call, "auto" for irrelevance; parallel_tool_calls
is true only for the parallel categories (the others' answer is exactly one call). Per category and mode
the report gives the accuracy by BFCL's AST rules (freehold/eval/bfcl_ast.py), the share of outputs that are
well-formed calls (at least one call; each names an offered tool and its arguments parse and validate against
that tool's schema) and the mean wall time per item ("ms per call"), one item at a time.

BFCL writes parameter types in its own dialect (dict, float, tuple, any); `tool_schema` turns them into JSON Schema.
"""
from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freehold.errors import InvalidRequestError
from freehold.eval.bfcl_ast import check, tool_name
from freehold.types import FinishReason, SamplingParams

_TYPES = {"dict": "object", "float": "number", "tuple": "array", "integer": "integer", "string": "string",
          "boolean": "boolean", "array": "array"}
_NOT_SCHEMA = ("optional",)  # BFCL annotations that are not JSON Schema keywords
_FILE = re.compile(r"BFCL_v\d+_(?P<category>\w+)\.json")
_PYTHON_AST = re.compile(r"(live_)?(simple(_python)?|multiple|parallel|parallel_multiple|irrelevance)")
MODES = ("constrained", "unconstrained")


@dataclass(frozen=True)
class Item:
    id: str
    messages: list[dict]
    functions: list[dict]  # BFCL's own function descriptions (the checker reads these)
    answers: list[dict]  # possible answers, [{name: {param: [values]}}]; [] for irrelevance

    @property
    def tools(self) -> list[dict]:
        return [{"type": "function", "function": {"name": tool_name(f["name"]), "description": f.get("description", ""),
                                                  "parameters": tool_schema(f["parameters"])}}
                for f in self.functions]


@dataclass
class Outcome:
    id: str
    mode: str
    text: str = ""
    calls: list[dict] = field(default_factory=list)  # [{name: arguments}] as parsed
    finished: bool = False  # the turn ended on its own (not max_tokens)
    well_formed: bool = False
    correct: bool = False
    error: str | None = None  # why the output is not well-formed or not correct
    ms: float = 0.0


@dataclass(frozen=True)
class CategoryReport:
    category: str
    mode: str
    num_items: int
    num_correct: int
    num_well_formed: int
    num_finished: int
    num_finished_well_formed: int
    ms_per_call: float  # mean over the items

    def row(self) -> list:
        pct = lambda a: 100.0 * a / self.num_items if self.num_items else 0.0  # noqa: E731
        of_finished = 100.0 * self.num_finished_well_formed / self.num_finished if self.num_finished else 0.0
        return [self.category, self.mode, self.num_items, pct(self.num_correct), pct(self.num_well_formed),
                pct(self.num_finished), of_finished, self.ms_per_call]


HEADERS = ["category", "mode", "items", "accuracy %", "well-formed %", "finished %", "well-formed % of finished",
           "ms per call"]


def tool_schema(bfcl: Any) -> Any:
    """BFCL's parameter schema as JSON Schema: dict->object, float->number, tuple->array, any->no type."""
    if isinstance(bfcl, list):
        return [tool_schema(v) for v in bfcl]
    if not isinstance(bfcl, dict):
        return bfcl
    out = {}
    for key, value in bfcl.items():
        if key in _NOT_SCHEMA:
            continue
        if key == "type" and isinstance(value, str):
            if value != "any":
                out[key] = _TYPES.get(value, value)
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: tool_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf"):
            out[key] = tool_schema(value)
        else:
            out[key] = value
    return out


def find_categories(directory: Path) -> dict[str, Path]:
    """{category: file} for the Python AST categories in a BFCL data folder, in name order."""
    if not directory.is_dir():
        raise InvalidRequestError(f"BFCL data folder not found: {directory}")
    found = {}
    for path in sorted(directory.glob("BFCL_v*_*.json")):
        m = _FILE.fullmatch(path.name)
        if m and _PYTHON_AST.fullmatch(m["category"]):
            found[m["category"]] = path
    return found


def load_items(path: Path, category: str, limit: int | None = None) -> list[Item]:
    questions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    answers: dict[str, list] = {}
    if "irrelevance" not in category:
        answer_file = path.parent / "possible_answer" / path.name
        if not answer_file.is_file():
            raise InvalidRequestError(f"no possible answers for {category}: {answer_file} is missing")
        for line in answer_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                answers[record["id"]] = record["ground_truth"]
    # one turn per item in the AST categories; BFCL nests the turn's messages in a list of turns
    return [Item(q["id"], q["question"][0], q["function"], answers.get(q["id"], [])) for q in questions]


def tool_choice_for(category: str) -> tuple[str, bool]:
    """(tool_choice, parallel_tool_calls) of a category's requests."""
    return ("auto" if "irrelevance" in category else "required"), "parallel" in category


def evaluate(llm, category: str, items: list[Item], mode: str, max_tokens: int = 256, frequency_penalty: float = 0.0,
             progress=None) -> tuple[CategoryReport, list[Outcome]]:
    """Greedy; a frequency penalty keeps a small model out of repetition loops (more outputs finish)."""
    run = _constrained if mode == "constrained" else _unconstrained
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, frequency_penalty=frequency_penalty)
    outcomes = []
    for i, item in enumerate(items):
        t0 = time.perf_counter()
        outcome = run(llm, item, params, *tool_choice_for(category))
        outcome.ms = 1000 * (time.perf_counter() - t0)
        _judge(category, item, outcome)
        outcomes.append(outcome)
        if progress is not None:
            progress(i + 1, len(items))
    report = CategoryReport(category, mode, len(items), sum(o.correct for o in outcomes),
                            sum(o.well_formed for o in outcomes), sum(o.finished for o in outcomes),
                            sum(o.finished and o.well_formed for o in outcomes),
                            statistics.fmean(o.ms for o in outcomes) if outcomes else 0.0)
    return report, outcomes


def details(outcomes: list[Outcome]) -> list[dict]:
    return [{"id": o.id, "mode": o.mode, "correct": o.correct, "well_formed": o.well_formed, "finished": o.finished,
             "error": o.error, "ms": o.ms, "calls": o.calls, "text": o.text} for o in outcomes]


# ---- private ------------------------------------------------------------------------------------------------------
def _constrained(llm, item: Item, params: SamplingParams, tool_choice: str, parallel: bool) -> Outcome:
    completion = llm.chat(item.messages, params, tools=item.tools, tool_choice=tool_choice,
                          parallel_tool_calls=parallel)[0].completions[0]
    return _outcome(item, "constrained", completion.text, completion.tool_calls, completion.finish_reason)


def _unconstrained(llm, item: Item, params: SamplingParams, tool_choice: str, parallel: bool) -> Outcome:
    from freehold.tools.parse import parse_tool_calls
    from freehold.tools.spec import tool_request
    prompt = llm.chat_prompt(item.messages, tool_request(item.tools, tool_choice, parallel))  # as `chat` renders it
    completion = llm.generate(prompt, params)[0].completions[0]
    return _outcome(item, "unconstrained", completion.text, parse_tool_calls(completion.text)[1],
                    completion.finish_reason)


def _outcome(item: Item, mode: str, text: str, tool_calls, reason: FinishReason | None) -> Outcome:
    outcome = Outcome(item.id, mode, text, finished=reason is not FinishReason.LENGTH)
    outcome.error = _malformed(item, tool_calls, outcome)
    outcome.well_formed = outcome.error is None
    return outcome


def _malformed(item: Item, tool_calls, outcome: Outcome) -> str | None:
    """Fill outcome.calls; the first reason the calls are not well-formed, or None."""
    import jsonschema  # the `eval` extra (commands.py checks it up front)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in item.tools}
    problem = None if tool_calls else "no tool call"
    for call in tool_calls:
        try:
            arguments = json.loads(call.arguments)
        except json.JSONDecodeError as exc:
            problem = problem or f"arguments of {call.name!r} are not JSON: {exc}"
            continue
        outcome.calls.append({call.name: arguments})
        if call.name not in schemas:
            problem = problem or f"{call.name!r} is not an offered tool"
            continue
        try:
            jsonschema.validate(arguments, schemas[call.name])
        except jsonschema.ValidationError as exc:
            problem = problem or f"arguments of {call.name!r} do not validate: {exc.message}"
    return problem


def _judge(category: str, item: Item, outcome: Outcome) -> None:
    wrong = check(category, item.functions, outcome.calls, item.answers)
    outcome.correct = wrong is None
    if "irrelevance" in category and not outcome.calls:
        outcome.well_formed, outcome.error = True, None  # no call is the well-formed answer here
    outcome.error = outcome.error or wrong
