"""RemoteModel against a stand-in OpenAI-compatible server (stdlib HTTP): what an unconstrained remote model can
send (unknown tools, broken JSON, HTTP errors) is fed back or ends the run with `error`, never a crash."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from freehold.agent import Agent, Limits, StopReason
from freehold.agent.events import ToolResult


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class StandIn:
    """Answers POST /v1/chat/completions from a script of replies (dicts: a chat completion's message, or an int:
    an HTTP error status); records each request body."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.requests: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                reply = stand_in.replies.pop(0)
                if isinstance(reply, int):
                    payload, status = {"error": {"message": "the stand-in refused", "type": "x"}}, reply
                else:
                    payload, status = {"choices": [{"index": 0, "message": reply, "finish_reason": "stop"}],
                                       "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                                                 "prompt_tokens_details": {"cached_tokens": 4}}}, 200
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture
def stand_in(request):
    server = StandIn(*request.param)
    yield server
    server.close()


@pytest.mark.parametrize("stand_in", [[
    {"role": "assistant", "content": None, "tool_calls": [tool_call("c1", "multiply", '{"a": 2}'),
                                                          tool_call("c2", "add", '{"a": 2, "b": ')]},
    {"role": "assistant", "content": None, "tool_calls": [tool_call("c3", "add", '{"a": 2, "b": 3}')]},
    {"role": "assistant", "content": "5"},
]], indirect=True)
def test_unknown_tools_and_broken_json_from_a_remote_model_are_fed_back(stand_in):
    result = Agent(stand_in.base_url, [add], instructions="sys", api_key="k").run("2+3?")
    assert result.stop_reason is StopReason.ANSWER and result.answer == "5"
    kinds = [(e.name, e.error_type) for e in result.events if isinstance(e, ToolResult)]
    assert kinds == [("multiply", "unknown_tool"), ("add", "invalid_arguments"), ("add", None)]
    second = stand_in.requests[1]
    assert second["path"] == "/v1/chat/completions" and second["auth"] == "Bearer k"
    assert second["tools"][0]["function"]["name"] == "add" and second["temperature"] == 0.0
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "tool"]
    assert "no tool named 'multiply'" in second["messages"][3]["content"]
    finished = result.finished
    assert (finished.prompt_tokens, finished.cached_tokens, finished.completion_tokens) == (21, 12, 9)


@pytest.mark.parametrize("stand_in", [[
    {"role": "assistant", "content": None, "tool_calls": [{"id": 7, "type": "function",
                                                          "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
    {"role": "assistant", "content": "3"},
]], indirect=True)
def test_arguments_sent_as_an_object_are_read_as_json(stand_in):
    result = Agent(stand_in.base_url, [add]).run("1+2?")
    assert result.stop_reason is StopReason.ANSWER
    done = [e for e in result.events if isinstance(e, ToolResult)]
    assert (done[0].call_id, done[0].arguments, done[0].output) == ("7", '{"a": 1, "b": 2}', "3")


@pytest.mark.parametrize("stand_in", [[500]], indirect=True)
def test_an_http_error_ends_the_run_with_error(stand_in):
    result = Agent(stand_in.base_url, [add]).run("go")
    assert result.stop_reason is StopReason.ERROR
    assert "HTTP 500: the stand-in refused" in result.detail


def test_a_server_that_is_not_there_ends_the_run_with_error():
    result = Agent("http://127.0.0.1:9/v1", [add], limits=Limits(max_seconds=10)).run("go")
    assert result.stop_reason is StopReason.ERROR and "/chat/completions" in result.detail


def test_a_model_that_is_not_a_url_is_refused():
    with pytest.raises(ValueError, match="base URL"):
        Agent("gpt-4o", [add])


@pytest.mark.parametrize("stand_in", [[
    {"role": "assistant", "content": None, "tool_calls": [tool_call("c1", "calculator", '{"expression": "6 * 7"}')]},
    {"role": "assistant", "content": "42"},
]], indirect=True)
def test_cli_agent_with_base_url_runs_the_loop_against_that_server(stand_in, capsys, monkeypatch):
    from freehold.cli import main
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert main(["agent", "6 times 7?", "--tools", "calculator", "--base-url", stand_in.base_url,
                 "--served-model", "remote-m", "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "calls calculator(" in out and "finished: " in out
    first, second = stand_in.requests
    assert first["path"] == "/v1/chat/completions" and first["model"] == "remote-m"
    assert first["auth"] == "Bearer from-env"  # the key from the environment, never in the URL
    assert second["messages"][-1]["role"] == "tool" and "42" in second["messages"][-1]["content"]
