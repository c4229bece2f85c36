"""POST /v1/responses through the official openai client: a text response (the same greedy text and prompt as chat
completions), function calls handed back and a round trip with their outputs, file_search run by the server over a
vector store made through /v1/vector_stores, the streamed events (order, sequence numbers, deltas adding up to the
final items, the stream helper rebuilding the non-streamed response), a client leaving mid-stream, structured output,
and the bad bodies, each an OpenAI-shaped 400 naming the field. Without the server: how each way the agent loop can
stop (driven by a scripted model) maps to a status the openai client's types accept, with the stop in `freehold`."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from freehold.agent import Agent, FunctionTool, Limits, client_tool
from freehold.agent.events import CallRecord
from freehold.agent.models import ModelError, TurnResult
from freehold.server.responses_output import ResponseOutput
from freehold.server.responses_protocol import ResponseObject
from freehold.tools.parse import ContentDelta
from tests.integration.conftest import MODEL_NAME, ServerProcess

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                  "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": WEATHER_SCHEMA, "strict": True}
CLOCK = {"type": "function", "name": "get_time", "description": "The local time in a city",
         "parameters": WEATHER_SCHEMA, "strict": True}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
DOCS = {"volcanoes.txt": "Volcanoes erupt when magma rises through the crust. Lava flows and ash clouds follow.",
        "baking.txt": "Bread is baked from flour, water, salt and yeast. The dough rises before it goes in the oven.",
        "chess.txt": "In chess, castling moves the king two squares towards a rook. A pawn promotes on the last rank."}


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def store_id(server: ServerProcess) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    vs = client.vector_stores.create(name="responses-kb")
    for name, text in DOCS.items():
        upload = client.files.create(file=(name, text.encode()), purpose="assistants")
        attached = client.vector_stores.files.create_and_poll(vector_store_id=vs.id, file_id=upload.id,
                                                             poll_interval_ms=100)
        assert attached.status == "completed", attached.last_error
    return vs.id


def _raw_events(server: ServerProcess, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed response's events as sent: `event:` line and `data:` JSON, checked to agree."""
    events = []
    with httpx.stream("POST", f"{server.base_url}/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                assert event["type"] == name
                events.append(event)
    return events


def _check_stream(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The stream's invariants; returns the final response. Created first, in_progress next, a terminal event last;
    sequence numbers 0, 1, 2, ...; each item added once and done once, its deltas adding up to its done text or
    arguments; the final response's output is the done items."""
    for event in events:  # each event as the openai client's types define it
        STREAM_EVENT.validate_python(event)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = {e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.added"}
    done = {e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.done"}
    assert sorted(added) == sorted(done) == list(range(len(added)))
    for index, item in done.items():
        assert item["id"] == added[index]["id"] and item["type"] == added[index]["type"]
        deltas = "".join(e["delta"] for e in events if e.get("output_index") == index and "delta" in e)
        if item["type"] == "message":
            assert deltas == item["content"][0]["text"]
        elif item["type"] == "function_call":
            assert deltas == item["arguments"]
    final = events[-1]["response"]
    assert final["output"] == [done[i] for i in range(len(done))]
    assert final["status"] == events[-1]["type"].split(".")[1]
    return final


def test_a_text_response_is_the_chat_completion_of_the_same_input(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL_NAME, input="What is 2+2?", max_output_tokens=48, temperature=0)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=48, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL_NAME
    assert r.output_text and r.output_text == chat.choices[0].message.content
    assert [item.type for item in r.output] == ["message"] and r.output[0].id.startswith("msg_")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.status == ("completed" if chat.choices[0].finish_reason == "stop" else "incomplete")
    assert r.max_output_tokens == 48 and r.temperature == 0 and r.error is None


def test_instructions_are_a_system_message_and_the_budget_cuts_the_output(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL_NAME, instructions="You are a pirate.", input="Tell me a long story.",
                                max_output_tokens=5, temperature=0)
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me a long story."}])
    assert r.output_text == chat.choices[0].message.content and r.usage.output_tokens == 5
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.instructions == "You are a pirate."
    assert Response.model_validate(r.to_dict()).freehold == {"stop_reason": "answer", "detail": r.freehold["detail"],
                                                             "context": None}  # no context assembly asked


def test_a_function_call_is_handed_back_and_its_output_answered(client: openai.OpenAI) -> None:
    named = {"type": "function", "name": "get_time"}
    r = client.responses.create(model=MODEL_NAME, input=ASK, tools=[WEATHER, CLOCK], tool_choice=named,
                                max_output_tokens=60, temperature=0)
    assert r.status == "completed" and [item.type for item in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_time" and call.status == "completed" and call.id.startswith("fc_")
    assert call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    # the round trip the Agents SDK makes: the input, the output items as they came, the call's output
    history = ASK + [item.model_dump(exclude_none=True) for item in r.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": "It is 10:30 in Paris."}]
    answer = client.responses.create(model=MODEL_NAME, input=history, tools=[WEATHER, CLOCK], tool_choice="none",
                                     max_output_tokens=30, temperature=0)
    assert [item.type for item in answer.output] == ["message"] and answer.output_text
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=30, temperature=0, tool_choice="none", tools=[
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in (WEATHER, CLOCK)],
        messages=ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                         "function": {"name": call.name, "arguments": call.arguments}}]},
                        {"role": "tool", "tool_call_id": call.call_id, "content": "It is 10:30 in Paris."}])
    assert answer.output_text == chat.choices[0].message.content  # the same prompt as the chat history
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_file_search_runs_on_the_server_and_feeds_the_model(client: openai.OpenAI, store_id: str) -> None:
    body: dict[str, Any] = dict(model=MODEL_NAME, input="How do volcanoes erupt?", tool_choice="required",
                                tools=[{"type": "file_search", "vector_store_ids": [store_id], "max_num_results": 2}],
                                parallel_tool_calls=False, temperature=0)
    first_turn = client.responses.create(**body, max_output_tokens=1)  # cut before a call: one turn, its prompt
    r = client.responses.create(**body, max_output_tokens=90, include=["file_search_call.results"])
    assert [item.type for item in r.output] == ["file_search_call", "message"]
    search = r.output[0]
    assert search.status == "completed" and search.id.startswith("fs_") and len(search.queries) == 1
    assert 1 <= len(search.results) <= 2 and {hit.filename for hit in search.results} <= set(DOCS)
    assert all(DOCS[hit.filename] in hit.text or hit.text in DOCS[hit.filename] for hit in search.results)
    assert [hit.score for hit in search.results] == sorted((hit.score for hit in search.results), reverse=True)
    # two turns: the second's prompt is the first's plus the call and the passages found
    assert r.usage.input_tokens > 2 * first_turn.usage.input_tokens


def test_streamed_text_follows_openais_event_order(server: ServerProcess, client: openai.OpenAI) -> None:
    body = {"model": MODEL_NAME, "input": "What is 2+2?", "max_output_tokens": 48, "temperature": 0}
    final = _check_stream(_raw_events(server, body))
    whole = client.responses.create(**body)
    assert final["output"][0]["content"][0]["text"] == whole.output_text
    assert final["usage"]["output_tokens"] == whole.usage.output_tokens


def test_streamed_calls_and_searches_rebuild_the_response(server: ServerProcess, client: openai.OpenAI,
                                                          store_id: str) -> None:
    body: dict[str, Any] = dict(model=MODEL_NAME, input=ASK, tools=[WEATHER], tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    with client.responses.stream(**body) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    whole = client.responses.create(**body)
    assert [(c.name, c.arguments) for c in final.output] == [(c.name, c.arguments) for c in whole.output]
    searched = _check_stream(_raw_events(server, {
        **body, "input": "How do volcanoes erupt?", "max_output_tokens": 60,
        "tools": [{"type": "file_search", "vector_store_ids": [store_id]}]}))
    assert searched["output"][0]["type"] == "file_search_call" and searched["output"][0]["status"] == "completed"
    assert searched["output"][0]["results"] is None  # only with include: ["file_search_call.results"]


def test_a_client_leaving_mid_stream_ends_the_engine_request(server: ServerProcess) -> None:
    with httpx.stream("POST", f"{server.base_url}/responses", timeout=60,
                      json={"input": "Write a very long story about a dragon.", "stream": True, "temperature": 0}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 20:
                break
    state = server.wait_idle()
    assert state["num_running"] == 0 and state["num_pending"] == 0


def test_structured_output_and_ignored_fields(server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    r = httpx.post(f"{server.url}/responses", timeout=60, json={  # the route without /v1 too
        "input": [{"role": "user", "content": "What is 2+2? Answer in JSON.", "mood": "calm"}], "frobnicate": 1,
        "text": {"format": {"type": "json_schema", "name": "sum", "schema": schema}}, "max_output_tokens": 40,
        "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["x-freehold-ignored-fields"] == "frobnicate, input[0].mood"
    body = r.json()
    jsonschema.validate(json.loads(body["output"][0]["content"][0]["text"]), schema)
    assert body["text"]["format"]["type"] == "json_schema"


F = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}
DEEP = "[" * 100_000 + "]" * 100_000  # past json's recursion limit; 200 KB, under the body limit
_OUTPUT = {"type": "function_call_output", "call_id": "c", "output": "x"}


def _call(arguments: str, name: str = "f") -> dict[str, Any]:
    return {"type": "function_call", "call_id": "c", "name": name, "arguments": arguments}


BAD = [({}, "input"),
       ({"input": 5}, "input"),
       ({"input": []}, "input"),
       ({"input": [{"type": "image_generation_call", "result": "x"}]}, "input[0].type"),
       ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
       ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
       ({"input": [{"role": "user", "content": "x"},
                   {"type": "function_call_output", "call_id": "call_9", "output": "x"}]}, "input[1].call_id"),
       ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
       ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}, "input[0].arguments"),
       ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
       ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
       ({"input": "x", "tools": [F, F]}, "tools[1].name"),
       ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
        "tools[0].parameters"),
       ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
       ({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].vector_store_ids"),
       ({"input": "x", "tools": [F], "tool_choice": "sometimes"}, "tool_choice"),
       ({"input": "x", "tools": [F], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice.name"),
       ({"input": "x", "tool_choice": "required"}, "tool_choice"),
       ({"input": "x", "tools": [F], "text": {"format": {"type": "json_object"}}}, "text.format"),
       ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
       ({"input": "x", "temperature": 2.5}, "temperature"),
       ({"input": "x", "previous_response_id": "resp_1", "conversation": "conv_1"}, "conversation"),
       ({"input": "x", "conversation": {"name": "c"}}, "conversation"),
       ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
       ({"input": "x", "truncation": "sometimes"}, "truncation"),
       ({"input": "x", "freehold": {"context": {"budget_tokens": 0}}}, "freehold.context.budget_tokens"),
       ({"input": "x", "include": ["message.output_text.logprobs"]}, "include[0]"),
       ({"input": "x " * 3000}, "input"),
       ({"input": [_call(DEEP), _OUTPUT]}, "input[0].arguments"),
       # lone surrogates (JSON \\ud800 escapes) in every string bound for the template or the tokenizer
       ({"input": "\ud800 hi"}, "input"),
       ({"input": "x", "instructions": "\ud800"}, "instructions"),
       ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "\ud800"}]}]},
        "input[0].content[0].text"),
       ({"input": "x", "tools": [{**F, "description": "\ud800"}]}, "tools[0].description"),
       ({"input": "x", "tools": [{**F, "parameters": {"type": "object", "properties": {
           "a": {"type": "string", "description": "\ud800"}}}}]}, "tools[0].parameters.properties.a.description"),
       ({"input": "x", "tools": [{**F, "parameters": {"type": "object", "properties": {"\ud800": {}}}}]},
        "tools[0].parameters.properties"),
       ({"input": [_call("{}", name="\ud800"), _OUTPUT]}, "input[0].name"),
       ({"input": [_call(json.dumps({"a": "\ud800"})), _OUTPUT]}, "input[0].arguments"),  # an escape in the JSON text
       ({"input": [_call("{}"), {**_OUTPUT, "output": "\ud800"}]}, "input[1].output"),
       ({"input": "x", "previous_response_id": "resp_\ud800"}, "previous_response_id"),  # ids bound into SQLite
       ({"input": "x", "conversation": "conv_\ud800"}, "conversation"),
       ({"input": "x", "freehold": {"context": {"namespace": "\ud800"}}}, "freehold.context.namespace"),
       ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": {
           "type": "object", "properties": {"a": {"enum": ["\ud800"]}}}}}}, "text.format.schema.properties.a.enum[0]")]


def _post_json(url: str, body: dict[str, Any]) -> httpx.Response:
    """The body as JSON text with \\uXXXX escapes (what a client sends for a lone surrogate)."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)


def test_bad_bodies_are_openai_shaped_400s_naming_the_field(server: ServerProcess, client: openai.OpenAI) -> None:
    for body, param in BAD:
        r = _post_json(f"{server.base_url}/responses", body)
        assert r.status_code == 400, (str(body)[:300], r.text[:300])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == param and error["message"], (str(body)[:300], error)
    # the same deep arguments in a chat completion's history
    history = [{"role": "user", "content": "x"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "f", "arguments": DEEP}}]},
               {"role": "tool", "tool_call_id": "c", "content": "x"}]
    chat = _post_json(f"{server.base_url}/chat/completions", {"model": MODEL_NAME, "messages": history,
                                                              "max_tokens": 2})
    assert chat.status_code == 400, chat.text[:300]
    assert chat.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"
    missing = httpx.post(f"{server.base_url}/responses", timeout=60,
                         json={"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["vs_nope"]}]})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "tools[0].vector_store_ids[0]"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL_NAME, input="x", max_output_tokens=0)
    assert client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=4).output_text


# ---- the loop's stops as responses (no server: a scripted model) ---------------------------------------------------
class _Script:
    """A ChatModel replaying turns: a str answers ("cut:" first: stopped by max_tokens), a list of (name, query)
    calls (query None: cut by max_tokens), an exception is raised, a float sleeps."""

    name = "scripted"

    def __init__(self, *turns: Any):
        self.turns = list(turns)

    async def turn(self, messages, tools, *, max_tokens, tool_choice="auto", parallel_tool_calls=True):
        script = self.turns.pop(0) if self.turns else "done"
        if isinstance(script, Exception):
            raise script
        if isinstance(script, float):  # a turn slower than the run's wall clock
            await asyncio.sleep(script)
        if isinstance(script, str):
            text = script.removeprefix("cut:")
            yield ContentDelta(text)
            yield TurnResult(text, [], "length" if script.startswith("cut:") else "stop", 10, 0, 5)
        else:
            calls = [CallRecord(f"call_{len(self.turns)}_{i}", name, '{"query": "' if query is None else
                                json.dumps({"query": query} if name == "file_search" else {"city": query}))
                     for i, (name, query) in enumerate(script)]
            yield TurnResult(None, calls, "length" if None in dict(script).values() else "tool_calls", 10, 0, 5)


def _search(query: str) -> str:
    return f"passages about {query}"


_SEARCH = FunctionTool("file_search", "Search the files", {"type": "object", "properties": {
    "query": {"type": "string"}}, "required": ["query"]}, _search)
_WEATHER = client_tool("get_weather", "The weather", WEATHER_SCHEMA)
S = "file_search"
STOPS = [  # (model turns, limits) -> status, incomplete_details.reason, freehold.stop_reason, output item statuses
    (["Hi"], Limits(), ("completed", None, "answer", ["completed"])),
    (["cut:Hi"], Limits(), ("incomplete", "max_output_tokens", "answer", ["incomplete"])),
    ([[("get_weather", "Paris")]], Limits(), ("completed", None, "client_tools", ["completed"])),
    ([[(S, "a")]], Limits(max_output_tokens=5), ("incomplete", "max_output_tokens", "budget", ["completed"])),
    ([[(S, "a"), (S, "b")]], Limits(max_tool_calls=1), ("incomplete", None, "budget", ["completed", "incomplete"])),
    ([[(S, None)]], Limits(), ("completed", None, "answer", ["incomplete", "completed"])),
    ([[(S, "a")], [(S, "a")], [(S, "a")]], Limits(),
     ("incomplete", None, "loop_detected", ["completed", "completed", "incomplete"])),
    ([[(S, "a")], [(S, "b")]], Limits(max_steps=2), ("incomplete", None, "max_steps", ["completed", "completed"])),
    ([[(S, "a")], 5.0], Limits(max_seconds=0.2), ("incomplete", None, "timeout", ["completed"])),
    ([[(S, "a")], ModelError("the prompt no longer fits")], Limits(), ("failed", None, "error", ["completed"]))]


@pytest.mark.parametrize("turns, limits, expected", STOPS)
def test_every_stop_is_a_response_the_openai_types_accept(turns: list[Any], limits: Limits,
                                                          expected: tuple[Any, ...]) -> None:
    agent = Agent(_Script(*turns), [_SEARCH, _WEATHER], limits=limits)
    head = ResponseObject(id="resp_test", created_at=0, status="in_progress", model="scripted")
    output = ResponseOutput(head, agent, None, include_results=False)

    async def run() -> list[dict[str, Any]]:
        events = output.start()
        async for event in agent.events("What now?"):
            events += output.on(event)
        return [event.model_dump(mode="json") for event in events]

    events = asyncio.run(run())
    final = _check_stream(events)
    assert final == output.response.model_dump(mode="json")
    status, reason, stop_reason, item_statuses = expected
    response = Response.model_validate(final)
    assert response.status == status and [item.status for item in response.output] == item_statuses
    assert (response.incomplete_details and response.incomplete_details.reason) == reason
    assert final["freehold"]["stop_reason"] == stop_reason and final["freehold"]["detail"]
    assert (response.error is not None) == (status == "failed")
