"""The OpenAI Agents SDK (`openai-agents`) against `freehold serve`, end to end through /v1/responses: the SDK's
model turns parse our function_call items, it runs the tool, sends back function_call_output items that the server
accepts, and the run ends with the model's answer, streamed and not. Tracing is off (it would call OpenAI)."""
from __future__ import annotations

import asyncio

import pytest
from agents import (Agent, MessageOutputItem, ModelSettings, OpenAIResponsesModel, Runner, ToolCallItem,
                    ToolCallOutputItem, function_tool, set_tracing_disabled)
from openai import AsyncOpenAI

from tests.integration.conftest import MODEL_NAME, ServerProcess


def _agent(server: ServerProcess, calls: list[str]) -> Agent:
    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city.

        Args:
            city: the city's name.
        """
        calls.append(city)
        return f"It is sunny and 21 C in {city}."

    client = AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    # the first turn must call (tool_choice resets to auto after it: reset_tool_choice); greedy, so not flaky
    settings = ModelSettings(tool_choice="required", temperature=0, max_tokens=60, parallel_tool_calls=False)
    return Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
                 model=OpenAIResponsesModel(MODEL_NAME, client), model_settings=settings)


def _check_run(result, calls: list[str]) -> None:
    """One call, run by the SDK with arguments our server generated; its output sent back and answered."""
    assert len(calls) == 1 and isinstance(calls[0], str) and 0 < len(calls[0]) <= 60
    kinds = [type(item) for item in result.new_items]
    assert kinds == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    call, output = result.new_items[0].raw_item, result.new_items[1].raw_item
    assert call.name == "get_weather" and output["call_id"] == call.call_id
    assert output["output"] == f"It is sunny and 21 C in {calls[0]}."
    assert isinstance(result.final_output, str) and result.final_output


@pytest.fixture(autouse=True)
def no_tracing() -> None:
    set_tracing_disabled(True)


def test_an_agents_sdk_run_calls_a_tool_and_answers(server: ServerProcess) -> None:
    calls: list[str] = []
    result = asyncio.run(Runner.run(_agent(server, calls), "What is the weather in Paris?", max_turns=3))
    _check_run(result, calls)


def test_a_streamed_agents_sdk_run_reads_our_events(server: ServerProcess) -> None:
    calls: list[str] = []

    async def run():
        streamed = Runner.run_streamed(_agent(server, calls), "What is the weather in Rome?", max_turns=3)
        kinds = [event.type async for event in streamed.stream_events()]
        return streamed, kinds

    result, kinds = asyncio.run(run())
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    _check_run(result, calls)
