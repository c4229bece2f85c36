"""Malformed and hostile requests get the right 4xx in OpenAI's error shape, and the server keeps serving.
Also: API-key auth and the waiting-queue limit (503 + Retry-After) on a second, keyed server."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, MODEL_NAME, ServerProcess

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 2}
COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
JSON_HEADERS = {"content-type": "application/json"}


def _ascii_json(body: dict) -> dict:
    """Request kwargs with a body httpx cannot encode itself (lone surrogates as \\u escapes)."""
    return {"content": json.dumps(body).encode(), "headers": JSON_HEADERS}


# (name, method, path, request kwargs, status, param or None, words the message must contain)
CASES = [
    ("malformed JSON", "POST", "/v1/chat/completions", {"content": b'{"model": ', "headers": JSON_HEADERS},
     400, None, "not valid JSON"),
    ("invalid UTF-8", "POST", "/v1/chat/completions",
     {"content": b'{"model": "\xff\xfe", "messages": []}', "headers": JSON_HEADERS}, 400, None, "UTF-8"),
    ("lone surrogate in prompt", "POST", "/v1/completions", _ascii_json({**COMPLETION, "prompt": "a\ud800b"}), 400,
     "prompt", "surrogate"),
    ("lone surrogate in message", "POST", "/v1/chat/completions",
     _ascii_json({**CHAT, "messages": [{"role": "user", "content": "\udfff"}]}), 400, "messages[0].content",
     "surrogate"),
    ("body is an array", "POST", "/v1/completions", {"json": [1, 2]}, 400, None, "JSON object"),
    ("empty body", "POST", "/v1/completions", {"content": b"", "headers": JSON_HEADERS}, 400, None, "missing"),
    ("wrong type", "POST", "/v1/chat/completions", {"json": {**CHAT, "temperature": "hot"}}, 400, "temperature",
     "valid number"),
    ("string for int", "POST", "/v1/completions", {"json": {**COMPLETION, "max_tokens": "5"}}, 400, "max_tokens",
     "valid integer"),
    ("negative max_tokens", "POST", "/v1/completions", {"json": {**COMPLETION, "max_tokens": -3}}, 400,
     "max_tokens", ">= 1"),
    ("temperature 5", "POST", "/v1/chat/completions", {"json": {**CHAT, "temperature": 5}}, 400, "temperature",
     "[0, 2]"),
    ("huge n", "POST", "/v1/chat/completions", {"json": {**CHAT, "n": 10000}}, 400, "n", "n must be"),
    ("top_p 0", "POST", "/v1/completions", {"json": {**COMPLETION, "top_p": 0}}, 400, "top_p", "(0, 1]"),
    ("unknown model", "POST", "/v1/chat/completions", {"json": {**CHAT, "model": "gpt-4o"}}, 404, "model",
     "gpt-4o"),
    ("model of the wrong type", "POST", "/v1/completions", {"json": {"prompt": "hi", "model": 5}}, 400, "model",
     "valid string"),
    ("empty messages", "POST", "/v1/chat/completions", {"json": {**CHAT, "messages": []}}, 400, "messages",
     "at least one"),
    ("bad role", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}}, 400, "messages[0].role", "wizard"),
    ("image part", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}},
     400, "messages[0].content[0]", "image_url"),
    ("100k-token prompt", "POST", "/v1/completions", {"json": {**COMPLETION, "prompt": "hello " * 100_000}}, 400,
     "prompt", "at least"),
    ("prompt + max_tokens over context", "POST", "/v1/completions", {"json": {**COMPLETION, "max_tokens": 4000}},
     400, "max_tokens", "context"),
    ("token id out of vocabulary", "POST", "/v1/completions", {"json": {**COMPLETION, "prompt": [1, 10**9]}}, 400,
     "prompt", "vocabulary"),
    ("prompt of booleans", "POST", "/v1/completions", {"json": {**COMPLETION, "prompt": [True]}}, 400, "prompt",
     "wrong type"),
    ("empty prompt", "POST", "/v1/completions", {"json": {**COMPLETION, "prompt": ""}}, 400, "prompt", "empty"),
    ("unsupported: audio", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "audio": {"voice": "x"}}}, 400, "audio", "not supported"),
    ("response_format json_schema without a schema", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "response_format": {"type": "json_schema"}}}, 400, "response_format.json_schema",
     "needs a 'json_schema'"),
    ("unsupported: suffix", "POST", "/v1/completions", {"json": {**COMPLETION, "suffix": "end"}}, 400, "suffix",
     "suffix"),
    ("best_of below n", "POST", "/v1/completions", {"json": {**COMPLETION, "n": 3, "best_of": 2}}, 400, "best_of",
     "best_of"),
    ("bad logit_bias key", "POST", "/v1/completions", {"json": {**COMPLETION, "logit_bias": {"abc": 1}}}, 400,
     "logit_bias", "token ids"),
    ("logit_bias out of range", "POST", "/v1/completions", {"json": {**COMPLETION, "logit_bias": {"5": 500}}}, 400,
     "logit_bias", "[-100, 100]"),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions", {"json": {**CHAT, "top_logprobs": 2}}, 400,
     "top_logprobs", "logprobs"),
    ("stream_options without stream", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "stream_options": {"include_usage": True}}}, 400, "stream_options", "stream"),
    ("min_tokens over max_tokens", "POST", "/v1/completions", {"json": {**COMPLETION, "min_tokens": 9}}, 400,
     "min_tokens", "min_tokens"),
    ("speculation the server runs without", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "num_speculative_tokens": 4}}, 400, "num_speculative_tokens", "--speculative ngram or draft"),
    ("negative num_speculative_tokens", "POST", "/v1/completions",
     {"json": {**COMPLETION, "num_speculative_tokens": -1}}, 400, "num_speculative_tokens", ">= 0"),
    ("unknown route", "GET", "/v1/engines", {}, 404, None, "no such route"),
    ("wrong method", "GET", "/v1/chat/completions", {}, 405, None, "not allowed"),
]


@pytest.mark.parametrize("name,method,path,kwargs,status,param,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server: ServerProcess, name: str, method: str, path: str, kwargs: dict, status: int,
                     param: str | None, words: str) -> None:
    r = httpx.request(method, f"{server.url}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] in ("invalid_request_error", "not_found_error")


def test_server_keeps_serving_after_bad_requests(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model=MODEL_NAME, messages=MSG, max_tokens=3, temperature=0)
    assert r.choices[0].message.content
    assert server.wait_idle()["kv_blocks_used"] == 0


def test_openai_client_raises_bad_request(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=MSG, temperature=3)
    assert info.value.body["param"] == "temperature"


# ---- the keyed server -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_api_key(keyed_server: ServerProcess, headers: dict) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/admin/reset_prefix_cache"),
                         ("GET", "/debug/engine")):
        r = httpx.request(method, f"{keyed_server.url}{path}", headers=headers, json=CHAT, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"


def test_api_key_accepted_and_open_routes(keyed_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=keyed_server.base_url, api_key=API_KEY, max_retries=0, timeout=60)
    assert client.models.list().data[0].id == MODEL_NAME
    assert client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.base_url, api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200
    assert httpx.get(f"{keyed_server.url}/metrics").status_code == 200


def test_full_waiting_queue_gets_503_with_retry_after(keyed_server: ServerProcess) -> None:
    """max_num_seqs 1 and max_waiting 1: one running stream, one waiting stream, the third request is refused."""
    headers = keyed_server.headers()
    body = {**COMPLETION, "prompt": "Count: one, two,", "max_tokens": 500, "ignore_eos": True, "stream": True}
    release = threading.Event()
    first_data: list[threading.Event] = [threading.Event(), threading.Event()]

    def hold_stream(i: int) -> None:
        with httpx.stream("POST", f"{keyed_server.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection
            if i == 0:  # the running one: wait for a token
                for line in lines:
                    if line.startswith("data: {"):
                        break
            first_data[i].set()
            release.wait(60)

    threads = [threading.Thread(target=hold_stream, args=(0,))]
    threads[0].start()
    assert first_data[0].wait(60)
    threads.append(threading.Thread(target=hold_stream, args=(1,)))
    threads[1].start()
    try:
        assert first_data[1].wait(60)
        _wait_for(lambda: keyed_server.engine_state()["num_pending"] == 1, keyed_server.engine_state)
        r = httpx.post(f"{keyed_server.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        release.set()
        for t in threads:
            t.join(30)
    state = keyed_server.wait_idle()
    assert state["num_running"] == state["num_waiting"] == state["kv_blocks_used"] == 0, state
    ok = httpx.post(f"{keyed_server.url}/v1/completions", json=COMPLETION, headers=headers, timeout=60)
    assert ok.status_code == 200 and json.loads(ok.text)["usage"]["completion_tokens"] >= 1


def _wait_for(predicate, describe, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached: {describe()}"
        time.sleep(0.05)
