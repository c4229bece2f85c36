"""What one client may cost the server, through the real server: bodies over the limit (413 before they are read
whole), prompts too long for the context (refused before tokenizing), grammar compiles on their own bounded pool
(a plain request never waits behind them; timeout 400, busy 503), a deadline for reading each request (408), a
cap on open connections (503), and inputs that used to be 500s (logit_bias '²', deeply nested schemas, grammars
no output satisfies).

Most tests use the session `server` (default limits); `tight` is a small server with tight limits."""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Iterator

import httpx
import pytest

from tests.integration.conftest import MODEL_NAME, ServerProcess, start_server, stop_server

COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
READ_TIMEOUT_S = 1.0
OPEN_FILES_SOFT_LIMIT = 512  # `tight` starts with this soft limit, many hosts' default is 1024


@pytest.fixture(scope="module")
def tight() -> Iterator[ServerProcess]:
    s = start_server("--kv-cache-memory", "64M", "--max-model-len", "512", "--request-read-timeout",
                     str(READ_TIMEOUT_S), "--max-connections", "4", "--grammar-compile-workers", "1",
                     "--grammar-compile-queue", "1", "--grammar-compile-timeout", "0.5",
                     open_files_soft_limit=OPEN_FILES_SOFT_LIMIT)
    yield s
    stop_server(s)


def post(server: ServerProcess, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=timeout)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:300]
    return response.json()["error"]


def slow_schema(tag: str, num_values: int = 12_000) -> dict:
    """A large enum: about a second to compile alone on one core (and ~40 MiB compiled)."""
    values = [f"{tag}-{i:06d}-{i * 7919 % 100003}" for i in range(num_values)]
    return {"type": "object", "properties": {"x": {"enum": values}}, "required": ["x"]}


def port_of(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw_exchange(server: ServerProcess, data: bytes, wait_s: float = 8.0) -> tuple[float, bytes]:
    """Send raw bytes, then read until the server closes (or `wait_s` passes): (seconds, what came back)."""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=wait_s) as sock:
        if data:
            sock.sendall(data)
        start, received = time.monotonic(), b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return time.monotonic() - start, received


def parse_response(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP response with a Content-Length: (status, body)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536) or b"<closed>"
        assert not raw.endswith(b"<closed>"), raw
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def peak_memory_bytes(server: ServerProcess) -> int:
    with open(f"/proc/{server.process.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# -- body size -------------------------------------------------------------------------------------------------------
def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 9437184\r\n\r\n{")  # 9 MiB declared, one byte sent
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(head)
        status, raw = read_response(sock)  # (a server that waits for the body times out here)
    error = json.loads(raw)["error"]
    assert status == 413 and "8388608 bytes" in error["message"] and error["type"] == "invalid_request_error"


def test_a_chunked_body_over_the_limit_is_refused(server):
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "%s", "prompt": "' % MODEL_NAME.encode()
        for _ in range(9):
            yield b"word " * (1 << 18)  # 1.25 MiB each
        yield b'", "max_tokens": 1}'
    response = httpx.post(f"{server.base_url}/completions", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=120)
    assert "--max-request-bytes" in error_of(response, 413)["message"]


# -- prompt length before tokenizing ---------------------------------------------------------------------------------
def test_a_prompt_far_over_the_context_is_refused_without_tokenizing_it(server):
    """Tokenizing a 7 MiB prompt costs seconds and ~700 MiB; the length bound answers first."""
    text = " ".join(["alpha", "beta", "gamma", "delta"] * 350_000)[: 7 << 20]
    before = peak_memory_bytes(server)
    completion = error_of(post(server, "/completions", {**COMPLETION, "prompt": text}), 400)
    chat = error_of(post(server, "/chat/completions", {**CHAT, "messages": [{"role": "user", "content": text}]}), 400)
    grown = peak_memory_bytes(server) - before
    assert (completion["param"], completion["code"]) == ("prompt", "context_length_exceeded")
    assert (chat["param"], chat["code"]) == ("messages", "context_length_exceeded")
    assert "at least" in completion["message"] and "2048 tokens" in completion["message"]
    assert grown < 256 << 20, f"the server's peak memory grew by {grown >> 20} MiB"


# -- bad input that used to be a 500 ---------------------------------------------------------------------------------
def test_a_logit_bias_key_int_cannot_read_is_a_400(server):
    error = error_of(post(server, "/completions", {**COMPLETION, "logit_bias": {"²": 1}}), 400)
    assert error["param"] == "logit_bias" and "token ids" in error["message"]


def nested_schema_text(levels: int) -> str:
    repeats = (levels - 1) // 2
    return '{"type":"object","properties":{"a":' * repeats + '{"type":"string"}' + "}}" * repeats


@pytest.mark.parametrize("levels", [900, 3000])
def test_a_deeply_nested_guided_json_string_is_a_400(server, levels):
    error = error_of(post(server, "/completions", {**COMPLETION, "guided_json": nested_schema_text(levels)}), 400)
    assert error["param"] == "guided_json" and "levels deep" in error["message"]


def test_a_deeply_nested_response_format_schema_is_a_400(server):
    schema = json.loads(nested_schema_text(400))
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}}
    error = error_of(post(server, "/chat/completions", body), 400)
    assert error["param"] == "response_format.json_schema.schema" and "levels deep" in error["message"]


EMPTY_LANGUAGE = [
    ("/completions", {**COMPLETION, "guided_regex": "[^\\s\\S]"}, "guided_regex"),
    ("/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "[^\\s\\S]"}}, "required": ["s"]}}}},
     "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("path,body,param", EMPTY_LANGUAGE, ids=["regex", "schema-pattern"])
def test_a_constraint_no_output_satisfies_is_refused_before_it_runs(server, path, body, param):
    for _ in range(2):  # the second answer comes from the cached verdict
        error = error_of(post(server, path, {**body, "stream": True}), 400)
        assert error["param"] == param and "no output satisfies it" in error["message"]


# -- grammar compiles ------------------------------------------------------------------------------------------------
def test_a_plain_request_does_not_wait_behind_slow_compiles(server):
    """Six large-schema requests used to fill the thread pool that tokenization shares, so an unrelated completion
    waited for the first compile to end. Now compiles have their own pool: the plain request finishes first."""
    done: dict[str, float] = {}
    start = time.monotonic()

    def structured(i: int) -> None:
        response = post(server, "/completions", {**COMPLETION, "guided_json": slow_schema(f"iso{i}")})
        if response.status_code == 200:
            done[f"compile{i}"] = time.monotonic() - start

    threads = [threading.Thread(target=structured, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the compiles are under way
    plain_start = time.monotonic()
    assert post(server, "/completions", {**COMPLETION, "max_tokens": 2}).status_code == 200
    plain_s = time.monotonic() - plain_start
    done["plain"] = time.monotonic() - start
    for t in threads:
        t.join()
    compiles = sorted(v for k, v in done.items() if k.startswith("compile"))
    assert compiles, "no structured request succeeded"
    assert done["plain"] < compiles[0], f"the plain request waited for a compile: {done}"
    assert plain_s < (compiles[0] - 0.5) / 2, f"plain request took {plain_s:.2f} s: {done}"


def test_compile_timeout_is_a_400_busy_is_a_503_and_the_compile_is_reused(tight):
    results: dict[str, httpx.Response] = {}

    def structured(name: str) -> None:
        results[name] = post(tight, "/completions", {**COMPLETION, "guided_json": slow_schema(name)})

    threads = []
    for name in ("first", "second", "third"):  # one worker, one queue slot: the third finds the pool full
        threads.append(threading.Thread(target=structured, args=(name,)))
        threads[-1].start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    for name in ("first", "second"):
        error = error_of(results[name], 400)
        assert (error["code"], error["param"]) == ("grammar_compile_timeout", "guided_json")
    busy = results["third"]
    assert error_of(busy, 503)["code"] == "grammar_compiler_busy" and busy.headers["retry-after"] == "1"
    deadline = time.monotonic() + 60  # the first compile goes on in the background; its result is kept
    again = {**COMPLETION, "guided_json": slow_schema("first")}
    while (retry := post(tight, "/completions", again)).status_code != 200:
        assert error_of(retry, 400)["code"] == "grammar_compile_timeout" and time.monotonic() < deadline
        time.sleep(0.5)
    assert post(tight, "/completions", COMPLETION).status_code == 200


# -- connections -----------------------------------------------------------------------------------------------------
REQUEST_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"


@pytest.mark.parametrize("data", [
    b"",  # connects and sends nothing
    REQUEST_HEAD,  # headers never finished (slowloris)
    REQUEST_HEAD + b"content-length: 100\r\n\r\n" + b'{"model": ',  # body never finished
], ids=["silent", "half-headers", "half-body"])
def test_a_request_not_sent_in_time_gets_408_and_the_connection_closes(tight, data):
    elapsed, raw = raw_exchange(tight, data)
    status, body = parse_response(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert READ_TIMEOUT_S * 0.9 <= elapsed < READ_TIMEOUT_S + 3


def test_the_read_deadline_restarts_for_each_request_on_a_kept_alive_connection(tight):
    body = json.dumps(COMPLETION).encode()
    full = REQUEST_HEAD + b"content-length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", port_of(tight)), timeout=10) as sock:
        for piece in (full[:20], full[20:60], full[60:]):  # a slow but steady client is served
            sock.sendall(piece)
            time.sleep(READ_TIMEOUT_S / 4)
        assert read_response(sock)[0] == 200
        time.sleep(READ_TIMEOUT_S * 1.5)  # idle between requests: the deadline is not running
        sock.sendall(REQUEST_HEAD)  # the next request starts and stalls
        start, raw = time.monotonic(), b""
        while chunk := sock.recv(65536):
            raw += chunk
        assert raw.startswith(b"HTTP/1.1 408") and time.monotonic() - start < READ_TIMEOUT_S + 3


def test_connections_beyond_the_cap_get_503_and_twice_the_cap_are_closed(tight):
    idle = [socket.create_connection(("127.0.0.1", port_of(tight))) for _ in range(4)]
    try:
        time.sleep(0.2)
        response = httpx.get(f"{tight.url}/health", timeout=5)
        assert error_of(response, 503)["code"] == "too_many_connections"
        extra = [socket.create_connection(("127.0.0.1", port_of(tight))) for _ in range(8)]
        idle += extra
        time.sleep(0.2)
        closed = 0
        for sock in extra:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except socket.timeout:
                pass
        assert closed >= 3, "connections past twice the cap must be closed at once"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{tight.url}/health", timeout=5).status_code == 200


def test_the_open_file_limit_is_raised_to_the_hard_limit(tight):
    with open(f"/proc/{tight.process.pid}/limits") as f:
        soft, hard = next(line.split()[3:5] for line in f if line.startswith("Max open files"))
    assert soft == hard and (hard == "unlimited" or int(hard) > OPEN_FILES_SOFT_LIMIT), (soft, hard)
