"""SIGTERM with requests in flight: the server stops accepting, lets requests finish for the grace period, then
ends each one left with a proper error (a stream: an error event and [DONE]; otherwise a 503 body) and exits."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.integration.conftest import MODEL_NAME, start_server, stop_server

GRACE_S = 4.0
LONG = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}


def test_sigterm_drains_then_ends_every_request_properly():
    server = start_server("--kv-cache-memory", "64M", "--max-model-len", "1024", "--shutdown-grace-seconds",
                          str(GRACE_S))
    results: dict[str, object] = {}
    first_token = threading.Event()

    def stream() -> None:
        events = []
        try:
            with httpx.stream("POST", f"{server.base_url}/completions", json={**LONG, "stream": True},
                              timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        first_token.set()
        except httpx.HTTPError as exc:
            events.append(f"transport error: {exc!r}")
        results["stream"] = events

    def call(name: str, body: dict) -> None:
        try:
            results[name] = httpx.post(f"{server.base_url}/completions", json=body, timeout=60)
        except httpx.HTTPError as exc:
            results[name] = exc

    try:
        threads = [threading.Thread(target=stream), threading.Thread(target=call, args=("long", LONG))]
        for t in threads:
            t.start()
        assert first_token.wait(60), "the stream never started"
        short = threading.Thread(target=call, args=("short", {**LONG, "max_tokens": 4}))
        short.start()
        time.sleep(0.2)
        server.process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        time.sleep(0.5)
        try:
            refused = httpx.get(f"{server.url}/health", timeout=3).status_code
        except httpx.TransportError:
            refused = "refused"
        for t in [*threads, short]:
            t.join(timeout=GRACE_S + 30)
        server.process.wait(timeout=GRACE_S + 15)
        exited_after = time.monotonic() - stopped_at
    finally:
        stop_server(server)

    assert refused == "refused", "a new connection was accepted after SIGTERM"
    short_response = results["short"]
    assert isinstance(short_response, httpx.Response) and short_response.status_code == 200, short_response
    assert short_response.json()["choices"][0]["finish_reason"] == "length"  # finished within the grace period

    events = results["stream"]
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "overloaded_error"
    assert len(events) > 3  # tokens streamed before the end

    long_response = results["long"]
    assert isinstance(long_response, httpx.Response), long_response
    assert long_response.status_code == 503 and long_response.json()["error"]["code"] == "server_shutting_down"
    assert GRACE_S - 0.5 < exited_after < GRACE_S + 8, exited_after
