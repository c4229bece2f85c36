"""`freehold eval tools`: BFCL's AST rules, the BFCL-to-JSON-Schema conversion, and both modes on the default model
over the BFCL-shaped fixture in tests/data/bfcl (5 items written for these tests)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from freehold.cli import main
from freehold.eval.bfcl_ast import check
from freehold.eval.tools import evaluate, find_categories, load_items, tool_schema

DATA = Path(__file__).parent.parent / "data" / "bfcl"
RECT = {"name": "geometry.rectangle_area", "parameters": {"type": "dict", "properties": {
    "width": {"type": "integer"}, "height": {"type": "float"}, "unit": {"type": "string"}},
    "required": ["width", "height"]}}
RECT_ANSWER = [{"geometry.rectangle_area": {"width": [7], "height": [3.0], "unit": ["units", ""]}}]


def rect(**args) -> list[dict]:
    return [{"geometry_rectangle_area": args}]


# ---- schema conversion and loading --------------------------------------------------------------------------------
def test_tool_schema_turns_bfcl_types_into_json_schema():
    bfcl = {"type": "dict", "required": ["a"], "properties": {
        "a": {"type": "float", "description": "x"}, "b": {"type": "tuple", "items": {"type": "float"}},
        "c": {"type": "any", "description": "anything"}, "d": {"type": "dict", "optional": True,
                                                             "properties": {"e": {"type": "array",
                                                                                  "items": {"type": "dict"}}}}}}
    assert tool_schema(bfcl) == {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "number", "description": "x"}, "b": {"type": "array", "items": {"type": "number"}},
        "c": {"description": "anything"},
        "d": {"type": "object", "properties": {"e": {"type": "array", "items": {"type": "object"}}}}}}


def test_fixture_categories_load_with_answers_and_openai_tool_names():
    found = find_categories(DATA)
    assert list(found) == ["multiple", "simple_python"]
    items = load_items(found["multiple"], "multiple")
    assert [i.id for i in items] == ["multiple_0", "multiple_1"] and all(i.answers for i in items)
    assert [t["function"]["name"] for t in items[0].tools] == ["weather_current", "weather_forecast"]
    assert len(load_items(found["simple_python"], "simple_python", limit=2)) == 2


# ---- the AST rules ------------------------------------------------------------------------------------------------
def test_a_right_call_passes_with_int_for_float_and_loose_string_matching():
    assert check("simple_python", [RECT], rect(width=7, height=3, unit="Units"), RECT_ANSWER) is None
    assert check("simple_python", [RECT], rect(width=7, height=3.0), RECT_ANSWER) is None  # "" marks it optional


@pytest.mark.parametrize("output, problem", [
    ([{"rectangle_area": {"width": 7, "height": 3}}], "not called"),
    (rect(width=7), "missing required parameter 'height'"),
    (rect(width=7, height=3, depth=1), "unexpected parameter 'depth'"),
    (rect(width=8, height=3), "invalid value for 'width'"),
    (rect(width=7.0, height=3), "wrong type for 'width'"),  # float for integer is not allowed
    (rect(width="7", height=3), "wrong type for 'width'"),
    (rect(width=7, height=3, unit="cm"), "invalid value for 'unit'"),
    (rect(width=7, height=3) * 2, "wrong number of calls"),
    ([], "wrong number of calls"),
])
def test_wrong_calls_fail_with_the_reason(output, problem):
    assert problem in check("simple_python", [RECT], output, RECT_ANSWER)


def test_parallel_calls_match_in_any_order_and_irrelevance_wants_no_call():
    answers = [{"geometry.rectangle_area": {"width": [7], "height": [3.0]}},
               {"geometry.rectangle_area": {"width": [1], "height": [2.0]}}]
    assert check("parallel", [RECT], rect(width=1, height=2) + rect(width=7, height=3), answers) is None
    assert "no call matches" in check("parallel", [RECT], rect(width=1, height=2) * 2, answers)
    assert check("irrelevance", [RECT], [], []) is None
    assert check("irrelevance", [RECT], rect(width=1, height=2), []) is not None


def test_fixture_answers_pass_and_other_functions_fail():
    for category, path in find_categories(DATA).items():
        for item in load_items(path, category):
            name, possible = next(iter(item.answers[0].items()))
            args = {k: v[0] for k, v in possible.items() if v[0] != ""}
            if name == "plan_drive":
                args["options"] = {"avoid_tolls": True}  # a dict answer lists each key's possible values
            assert check(category, item.functions, [{name.replace(".", "_"): args}], item.answers) is None
            other = [f["name"] for f in item.functions if f["name"] != name]
            if other:
                assert check(category, item.functions, [{other[0].replace(".", "_"): args}], item.answers)


# ---- both modes on the default model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_results(auto_llm):
    """The default weights (int4: about 4x the fp32 weights' decode speed on CPU) and settings: the session's
    LLM (tests/conftest.py), its prefix cache emptied first, so that it runs as a freshly loaded one would."""
    llm = auto_llm
    llm.engine.reset_prefix_cache()
    assert not llm.engine.has_unfinished()
    results = {}
    for category, path in find_categories(DATA).items():
        items = load_items(path, category)
        for mode in ("constrained", "unconstrained"):
            results[category, mode] = evaluate(llm, category, items, mode, max_tokens=96)
    return results


def test_every_finished_constrained_output_is_a_well_formed_call(fixture_results):
    """Finished = the turn ended on its own. A greedy 135M model can loop inside an array until max_tokens (it does
    on plan_drive's `stops`): that output is cut off, so it is reported unfinished and not well-formed."""
    outcomes = [o for (category, mode), (_, out) in fixture_results.items() if mode == "constrained" for o in out]
    finished = [o for o in outcomes if o.finished]
    assert len(outcomes) == 5 and len(finished) >= 3
    assert [(o.id, o.error) for o in finished if not o.well_formed] == []
    assert all(o.calls and o.text.startswith("<tool_call>") for o in finished)


def test_reports_count_the_outcomes_and_calls_come_from_the_text(fixture_results):
    from freehold.tools.parse import parse_tool_calls
    for (category, mode), (report, outcomes) in fixture_results.items():
        assert (report.category, report.mode, report.num_items) == (category, mode, len(outcomes))
        assert report.num_correct == sum(o.correct for o in outcomes)
        assert report.num_well_formed == sum(o.well_formed for o in outcomes)
        assert report.ms_per_call == pytest.approx(sum(o.ms for o in outcomes) / len(outcomes))
        for o in outcomes:
            if mode == "unconstrained":
                parsed = [{c.name: json.loads(c.arguments)} for c in parse_tool_calls(o.text)[1]]
                assert o.calls == parsed  # (every fixture output parses: a call that does not would be left out)


# ---- the command --------------------------------------------------------------------------------------------------
def test_cli_writes_a_table_per_category(tmp_path, capsys, monkeypatch, auto_llm):
    """The command in this process on the session's default LLM (tests/conftest.py): the commands' shared model
    loading (commands.load_llm) runs in the other CLI tests (test_speculative.py, test_perplexity.py)."""
    from freehold import commands
    loads = []
    monkeypatch.setattr(commands, "load_llm", lambda args: loads.append((args.model, args.weights)) or auto_llm)
    rc = main(["eval", "tools", "--data", str(DATA), "--categories", "multiple", "--limit", "1", "--max-tokens", "64",
               "--out", str(tmp_path)])
    assert rc == 0 and loads == [(None, "auto")]  # the default model and weights, loaded once
    record = json.loads((tmp_path / "tools_multiple.json").read_text())
    assert [row[:3] for row in record["rows"]] == [["multiple", "constrained", 1], ["multiple", "unconstrained", 1]]
    assert "well-formed %" in capsys.readouterr().out


def test_cli_names_an_unknown_category_before_loading_a_model(capsys):
    assert main(["eval", "tools", "--data", str(DATA), "--categories", "parallel"]) == 2
    assert "unknown category or mode 'parallel'" in capsys.readouterr().err


def test_the_tool_call_cost_bench_is_registered_with_an_output_folder():
    from freehold.cli import build_parser
    args = build_parser().parse_args(["bench", "tools", "--batches", "1", "--out", "here"])
    assert (args.bench_command, args.batches, args.out) == ("tools", "1", Path("here"))


def test_a_missing_jsonschema_is_named_before_the_model_loads(monkeypatch, capsys):
    import sys

    from freehold import commands
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # `import jsonschema` fails, as when it is not installed

    def load_llm(args):
        raise AssertionError("the model loaded before the missing package was reported")
    monkeypatch.setattr(commands, "load_llm", load_llm)
    assert main(["eval", "tools", "--data", str(DATA)]) == 2
    assert "pip install 'freehold[eval]'" in capsys.readouterr().err
