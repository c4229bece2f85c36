"""Browser access (CORS), the un-prefixed route aliases and /tokenize, /detokenize, against the real server.

The CORS tests share one server with an API key, allowed origins and a small body limit; the rest use the session
`server` (no key). Counts are checked against what the completion endpoints report and ids against the tokenizer.
"""
from __future__ import annotations

import argparse
import json
from typing import Iterator

import httpx
import openai
import pytest

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from freehold.server.auth import APIKeyMiddleware
from freehold.server.compat import IGNORED_FIELDS_HEADER
from freehold.server.main import add_serve_arguments, cors_policy
from tests.integration.conftest import API_KEY, MODEL_NAME, ServerProcess, start_server, stop_server

ORIGIN = "http://ui.example:3000"
OTHER_ORIGIN = "https://evil.example"
BODY_LIMIT = 4096
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
TEXT = "Héllo wörld — 你好 🙂\n  spaced\ttabs <|im_start|> end"


# ---- CORS -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cors_server() -> Iterator[ServerProcess]:
    s = start_server("--kv-cache-memory", "64M", "--max-model-len", "1024", "--max-num-seqs", "2",
                     "--max-request-bytes", str(BODY_LIMIT), "--allowed-origins", f"{ORIGIN},http://localhost:5173",
                     api_key=API_KEY)
    yield s
    stop_server(s)


def _preflight(server: ServerProcess, path: str, origin: str, headers: str = "authorization, content-type",
               method: str = "POST") -> httpx.Response:
    return httpx.options(f"{server.url}{path}", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions", "/tokenize", "/v1/models"])
def test_preflight_is_answered_without_the_key(cors_server: ServerProcess, path: str) -> None:
    r = _preflight(cors_server, path, ORIGIN, "authorization, content-type, x-stainless-os")
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert {"GET", "POST"} <= {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert r.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert "access-control-allow-credentials" not in r.headers


def test_preflight_from_another_origin_is_not_allowed(cors_server: ServerProcess) -> None:
    r = _preflight(cors_server, "/v1/chat/completions", OTHER_ORIGIN)
    assert "access-control-allow-origin" not in r.headers
    r = _preflight(cors_server, "/v1/chat/completions", ORIGIN, method="DELETE")  # not an allowed method
    assert r.status_code == 400


def test_private_network_preflight_of_a_named_origin(cors_server: ServerProcess) -> None:
    r = httpx.options(f"{cors_server.url}/v1/completions", timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Private-Network": "true"})
    assert r.status_code == 200 and r.headers["access-control-allow-private-network"] == "true"


def test_request_from_an_allowed_origin_with_the_key(cors_server: ServerProcess) -> None:
    body = {"model": MODEL_NAME, "prompt": "The sky is", "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{cors_server.url}/v1/completions", json=body, timeout=60,
                   headers={"Origin": ORIGIN, **cors_server.headers()})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN and "Origin" in r.headers["vary"]
    assert r.headers["access-control-expose-headers"] == IGNORED_FIELDS_HEADER  # the page may read it
    other = httpx.post(f"{cors_server.url}/v1/completions", json=body, timeout=60,
                       headers={"Origin": OTHER_ORIGIN, **cors_server.headers()})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions", "/completions", "/models",
                                  f"/models/{MODEL_NAME}", "/tokenize", "/v1/tokenize", "/detokenize"])
def test_without_the_key_still_401_and_readable(cors_server: ServerProcess, path: str) -> None:
    send = httpx.get if "models" in path else httpx.post
    r = send(f"{cors_server.url}{path}", headers={"Origin": ORIGIN}, timeout=10,
             **({} if send is httpx.get else {"json": {"prompt": "x"}}))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["access-control-allow-origin"] == ORIGIN  # the page can show why


def test_error_responses_carry_the_cors_headers(cors_server: ServerProcess) -> None:
    headers = {"Origin": ORIGIN, **cors_server.headers()}
    bad = httpx.post(f"{cors_server.url}/v1/chat/completions", json={"messages": "nope"}, headers=headers, timeout=10)
    assert bad.status_code == 400 and bad.headers["access-control-allow-origin"] == ORIGIN
    big = httpx.post(f"{cors_server.url}/v1/completions", json={"prompt": "x" * (2 * BODY_LIMIT)}, headers=headers,
                     timeout=10)
    assert big.status_code == 413 and big.headers["access-control-allow-origin"] == ORIGIN


def test_the_key_check_lets_only_preflights_through() -> None:
    """Without CORS in front (no --allowed-origins), a preflight still never meets the key check: the router
    answers it. Any other request to a protected path, OPTIONS included, needs the key."""
    app = Starlette(routes=[Route("/v1/models", lambda request: PlainTextResponse("reached"), methods=["OPTIONS"])])
    client = TestClient(APIKeyMiddleware(app, api_key=API_KEY))
    preflight = client.options("/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.text == "reached"
    assert client.options("/v1/models", headers={"Origin": ORIGIN}).status_code == 401
    assert client.options("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).text == "reached"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_cors_flags() -> None:
    assert cors_policy(_parse()) is None  # off by default
    policy = cors_policy(_parse("--allowed-origins", "http://a.example, http://b.example:8080",
                                "--allowed-origins", "http://[::1]:3000", "--allowed-methods", "get,post"))
    assert policy.allowed_origins == ("http://a.example", "http://b.example:8080", "http://[::1]:3000")
    assert policy.allowed_methods == ("GET", "POST") and policy.allowed_headers == ("*",)
    for wrong in ("http://localhost:3000/", "localhost:3000", "http://Example.com", "http://a.example/app"):
        with pytest.raises(SystemExit):
            _parse("--allowed-origins", wrong)
    with pytest.raises(ValueError, match="need --allowed-origins"):
        cors_policy(_parse("--allowed-headers", "authorization"))


# ---- tokenize / detokenize ----------------------------------------------------------------------------------------
def _post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    # json.dumps escapes to ASCII: a lone surrogate travels as the JSON escape \ud800 (httpx could not encode it)
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=120,
                      headers={"Content-Type": "application/json"})


def test_tokenize_chat_counts_what_chat_completions_counts(server: ServerProcess, tokenizer) -> None:
    t = _post(server, "/tokenize", {"model": MODEL_NAME, "messages": CHAT}).json()
    chat = _post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 1}).json()
    assert t["count"] == chat["usage"]["prompt_tokens"] == len(t["tokens"])
    assert t["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    assert t["max_model_len"] == 2048 and t["token_strs"] is None
    no_header = _post(server, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}).json()
    assert no_header["count"] < t["count"] and t["tokens"][:no_header["count"]] == no_header["tokens"]


def test_tokenize_chat_with_tools_counts_what_chat_completions_counts(server: ServerProcess) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    t = _post(server, "/tokenize", {"messages": CHAT, "tools": tools}).json()
    chat = _post(server, "/v1/chat/completions",
                 {"model": MODEL_NAME, "messages": CHAT, "tools": tools, "max_tokens": 1}).json()
    plain = _post(server, "/tokenize", {"messages": CHAT}).json()
    assert t["count"] == chat["usage"]["prompt_tokens"] > plain["count"]


def test_tokenize_prompt_counts_what_completions_counts(server: ServerProcess, tokenizer) -> None:
    t = _post(server, "/tokenize", {"prompt": TEXT, "return_token_strs": True}).json()
    done = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": TEXT, "max_tokens": 1}).json()
    assert t["count"] == done["usage"]["prompt_tokens"] == len(t["tokens"])
    assert t["tokens"] == tokenizer.encode(TEXT)
    assert t["token_strs"] == [tokenizer.id_to_token(i) for i in t["tokens"]]
    assert _post(server, "/v1/tokenize", {"prompt": TEXT, "return_token_strs": True}).json() == t


def test_detokenize_inverts_tokenize(server: ServerProcess) -> None:
    for text in (TEXT, "", "  leading and trailing  ", "\n\n"):
        ids = _post(server, "/tokenize", {"prompt": text}).json()["tokens"]
        assert _post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": text}
        assert _post(server, "/v1/detokenize", {"model": MODEL_NAME, "tokens": ids}).json() == {"prompt": text}


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, "messages"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/tokenize", {"messages": CHAT, "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"prompt": 12}, "prompt"),
    ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ("/tokenize", {"prompt": "word " * 40000}, "prompt"),  # refused from its length, before tokenizing
    ("/tokenize", {"messages": [{"role": "user", "content": "word " * 40000}]}, "messages"),
    ("/detokenize", {"tokens": [1, 2, 49152]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": ["1"]}, "tokens[0]"),
    ("/detokenize", {}, "tokens"),
])
def test_bad_tokenize_requests_are_400s(server: ServerProcess, path: str, body: dict, param: str) -> None:
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tokenize_checks_the_model(server: ServerProcess) -> None:
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        r = _post(server, path, {**body, "model": "gpt-4"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unknown_tokenize_fields_are_ignored_and_listed(server: ServerProcess) -> None:
    """The same rule as the completion endpoints (freehold.server.compat)."""
    r = _post(server, "/tokenize", {"prompt": "a", "frobnicate": 1, "messages": None})
    assert r.status_code == 200 and r.headers["x-freehold-ignored-fields"] == "frobnicate"
    assert r.json()["tokens"] == _post(server, "/tokenize", {"prompt": "a"}).json()["tokens"]


# ---- un-prefixed aliases ----------------------------------------------------------------------------------------
def test_aliases_answer_as_the_v1_routes(server: ServerProcess) -> None:
    def get(path: str) -> httpx.Response:
        return httpx.get(f"{server.url}{path}", timeout=10)

    assert get("/models").json() == get("/v1/models").json()
    assert get(f"/models/{MODEL_NAME}").json() == get(f"/v1/models/{MODEL_NAME}").json()
    assert get("/models/nope").status_code == get("/v1/models/nope").status_code == 404
    chat = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 8, "temperature": 0}
    a, b = _post(server, "/chat/completions", chat).json(), _post(server, "/v1/chat/completions", chat).json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"] and a["object"] == "chat.completion"
    text = {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    a, b = _post(server, "/completions", text).json(), _post(server, "/v1/completions", text).json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"] and a["object"] == "text_completion"


def test_openai_client_with_a_base_url_without_v1(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens <= 4


def test_each_route_is_in_the_openapi_schema_once(server: ServerProcess) -> None:
    paths = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    for shown in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"):
        assert shown in paths
    for alias in ("/chat/completions", "/completions", "/models", "/v1/tokenize", "/v1/detokenize"):
        assert alias not in paths
