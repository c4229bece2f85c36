"""The agent loop on the real default model: constrained calls reach the tool, results reach the next turn (whose
prompt reuses the previous one's KV through the prefix cache), limits hold; and the `freehold agent` CLI."""
from __future__ import annotations

import json
import subprocess
import sys

from freehold.agent import Agent, Limits, StopReason
from freehold.agent.builtin.calculator import calculator
from freehold.agent.events import ModelTurn, RunFinished, ToolResult
from freehold.agent.trace import read_trace

INSTRUCTIONS = "Use the calculator tool for arithmetic, then answer with the result."


def test_a_run_on_the_default_model_calls_the_tool_and_feeds_the_result_back(default_llm, tmp_path):
    trace = tmp_path / "run.jsonl"
    result = Agent(default_llm, [calculator], instructions=INSTRUCTIONS, tool_choice="required",
                   limits=Limits(max_steps=3, max_turn_tokens=96)).run("What is 4821 * 377?", trace=trace)
    turns = [e for e in result.events if isinstance(e, ModelTurn)]
    tools = [e for e in result.events if isinstance(e, ToolResult)]
    assert turns[0].calls and turns[0].calls[0].name == "calculator"
    if turns[0].finish_reason != "length":  # constrained: a finished call is well-formed
        json.loads(turns[0].calls[0].arguments)
    assert tools and tools[0].call_id == turns[0].calls[0].id
    if tools[0].ok:  # the model chose the expression; an invalid or cut-off one is fed back as an error instead
        assert tools[0].output == calculator(**json.loads(tools[0].arguments))
    assert len(turns) >= 2, "the tool's result must reach a next turn"
    # the second prompt extends the first (call and result appended): the prefix cache serves the shared part (all
    # of the tool list; the system message's last line differs, "required" asks for a call)
    assert turns[1].prompt_tokens > turns[0].prompt_tokens
    assert turns[1].cached_tokens >= turns[0].prompt_tokens // 2
    assert result.messages[3]["role"] == "tool" and result.messages[3]["content"] == tools[0].output
    assert result.stop_reason in set(StopReason) - {StopReason.ERROR, StopReason.CLIENT_TOOLS}
    assert read_trace(trace) == result.events
    assert isinstance(result.events[-1], RunFinished)


def test_the_token_budget_ends_a_run_on_the_real_model(default_llm):
    result = Agent(default_llm, [calculator], tool_choice="required",
                   limits=Limits(max_total_tokens=600, max_turn_tokens=48)).run("What is 12345 * 6789?")
    # turn 1 (a forced call) spends ~380 tokens; turn 2's prompt would hold at least those again: no room left
    assert result.stop_reason is StopReason.BUDGET and "token budget" in result.detail
    assert result.finished.steps == 1 and result.finished.tool_calls == 1
    assert result.finished.total_tokens <= 600


def test_cli_streams_steps_writes_a_trace_and_renders_it(tmp_path, capsys):
    """One real run in its own process (the command as a user runs it); the trace rendering and the argument errors
    in this process (they load no model)."""
    from freehold.cli import main
    trace = tmp_path / "cli.jsonl"
    cmd = [sys.executable, "-m", "freehold.cli", "agent", "What is 98765 * 4321?", "--tools", "calculator",
           "--tool-choice", "required", "--max-steps", "2", "--max-tokens", "48", "--trace", str(trace)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr
    assert "step 1  model:" in run.stdout and "calls calculator(" in run.stdout and "finished: " in run.stdout
    events = read_trace(trace)
    assert events[0].type == "run_started" and events[-1].type == "run_finished"
    code, (out, err) = main(["agent", "trace", str(trace)]), capsys.readouterr()
    assert code == 0 and "tool calculator" in out and "finished: " in out
    for argv, words in ((["go", "--tools", "calculator,teleport"], "teleport"), (["trace"], "trace FILE"),
                        (["trace", str(tmp_path / "none.jsonl")], "cannot read the trace"),
                        (["go", "--tools", "file_search"], "--store"),
                        (["go", "--retries-after-error", "-1"], "--retries-after-error"),
                        (["go", "--tools", "none", "--retries-after-error", "1"], "--retries-after-error"),
                        (["go", "--tool-choice", "none", "--retries-after-error", "1"], "--retries-after-error")):
        code, (out, err) = main(["agent", *argv]), capsys.readouterr()
        assert code == 2 and words in err and "Traceback" not in err, (argv, err)

