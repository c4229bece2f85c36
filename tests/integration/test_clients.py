"""Drop-in for real clients (issue 15): the official `openai` client, `langchain-openai` and `litellm` against a real
server on the default settings (the GGUF's own int4/q8 weights), plus the raw wire details those clients rely on.

One server for the file: the default model under two names (`--served-model-name SmolLM2-135M-Instruct smol`).
"""
from __future__ import annotations

import json
from typing import Iterator, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from freehold.server.compat import IGNORED_FIELDS_HEADER
from freehold.tokenizer import TemplateOptions, Tokenizer
from tests.integration.conftest import API_KEY, MODEL_NAME, ServerProcess, start_server, stop_server

ALIAS = "smol"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def clients_server() -> Iterator[ServerProcess]:
    s = start_server("--kv-cache-memory", "128M", "--max-model-len", "2048", "--served-model-name", MODEL_NAME, ALIAS)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(clients_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=clients_server.base_url, api_key="unused", max_retries=0)


def _post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers(), timeout=120)


def _sse(response: httpx.Response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- 1. fields: accepted, passed to the template, ignored, refused ----------------------------------------------
def test_extra_body_fields_are_accepted_and_unknown_ones_listed(client: openai.OpenAI,
                                                                clients_server: ServerProcess) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "name": "alice", "content": "Say hello."}], max_tokens=4,
        temperature=0, user="u-1", metadata={"team": "a"}, service_tier="auto", store=False,
        extra_body={"reasoning_effort": "low", "chat_template_kwargs": {"enable_thinking": False},
                    "frobnicate": 1, "add_generation_prompt": True, "modalities": ["text"]})
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.service_tier == "auto"
    assert raw.headers[IGNORED_FIELDS_HEADER] == "frobnicate"
    log = clients_server.log()
    assert 'request metadata: {"team": "a"}' in log and "ignored unknown request fields: frobnicate" in log


def test_unknown_nested_fields_are_listed_with_their_path(clients_server: ServerProcess) -> None:
    r = _post(clients_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}], "max_tokens": 2,
        "stream_options": None, "x_vendor": True})
    assert r.status_code == 200, r.text
    assert r.headers[IGNORED_FIELDS_HEADER] == "x_vendor, messages[0].cache_control"


def test_a_request_with_only_known_fields_has_no_ignored_header(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL_NAME, messages=HELLO, max_tokens=2)
    assert IGNORED_FIELDS_HEADER not in raw.headers


def test_strict_api_refuses_unknown_fields(keyed_server: ServerProcess) -> None:
    r = _post(keyed_server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, "frobnicate": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "frobnicate"


@pytest.mark.parametrize("body, param", [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"web_search_options": {}}, None),  # an empty options object asks for nothing
    ({"temperature": "hot"}, "temperature"),  # real mistakes stay 400s
    ({"max_tokens": -1}, "max_tokens"),
    ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
])
def test_fields_freehold_cannot_honour_and_real_mistakes_are_400s(clients_server: ServerProcess, body: dict,
                                                                   param: str | None) -> None:
    r = _post(clients_server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2, **body})
    if param is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_stays_a_400(clients_server: ServerProcess) -> None:
    r = httpx.post(f"{clients_server.base_url}/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_continue_final_message_prefills_the_assistant_turn(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    completion = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=3, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    text = tokenizer.apply_chat_template(messages, options=TemplateOptions(False, True))
    assert text.endswith("The capital of France is")  # no end-of-turn after the prefill
    assert completion.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    assert "Paris" in completion.choices[0].message.content


def test_add_generation_prompt_false_renders_no_assistant_header(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    with_header = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=1)
    without = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=1,
                                             extra_body={"add_generation_prompt": False})
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert with_header.usage.prompt_tokens - without.usage.prompt_tokens == len(header)


# ---- 2. model names and routes ----------------------------------------------------------------------------------
def test_model_may_be_absent_or_any_served_alias(clients_server: ServerProcess, client: openai.OpenAI) -> None:
    r = _post(clients_server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL_NAME
    assert client.chat.completions.create(model=ALIAS, messages=HELLO, max_tokens=2).model == ALIAS
    assert [m.id for m in client.models.list()] == [MODEL_NAME, ALIAS]
    assert client.models.retrieve(ALIAS).id == ALIAS


def test_an_unknown_model_is_a_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)


def test_a_base_url_without_v1_works(clients_server: ServerProcess) -> None:
    bare = openai.OpenAI(base_url=clients_server.url, api_key="unused", max_retries=0)
    assert bare.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=2).choices[0].message.content
    assert bare.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2).choices[0].text
    assert [m.id for m in bare.models.list()] == [MODEL_NAME, ALIAS]


# ---- 5. streaming details ---------------------------------------------------------------------------------------
def test_stream_shape_matches_openai(clients_server: ServerProcess) -> None:
    r = _post(clients_server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 5, "temperature": 0,
                                                        "stream": True, "stream_options": {"include_usage": True}})
    chunks = _sse(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["system_fingerprint"] == chunks[0]["system_fingerprint"] for c in chunks)
    assert chunks[0]["system_fingerprint"].startswith("fh-") and "-int4-" in chunks[0]["system_fingerprint"]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    content = [c["choices"][0] for c in chunks[1:-2]]
    assert content and all(c["finish_reason"] is None and c["delta"]["content"] for c in content)


def test_streamed_text_equals_the_plain_response(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0)
    assert plain.system_fingerprint.startswith("fh-")
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0,
                                             stream=True) if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content


# ---- LangChain and litellm --------------------------------------------------------------------------------------
class Verdict(BaseModel):
    answer: Literal["yes", "no"]


def test_langchain_invoke_stream_and_structured_output(clients_server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=clients_server.base_url, api_key="unused", model=ALIAS, temperature=0, max_tokens=12,
                     max_retries=0)
    invoked = llm.invoke("Say hello.")
    assert invoked.content
    streamed = "".join(chunk.content for chunk in llm.stream("Say hello."))
    assert streamed == invoked.content
    verdict = llm.with_structured_output(Verdict).invoke("Is the sky blue? Answer yes or no.")
    assert isinstance(verdict, Verdict)


def test_litellm_completion_and_stream(clients_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of litellm's price list
    import litellm

    litellm.telemetry = False
    kwargs = dict(model=f"openai/{MODEL_NAME}", api_base=clients_server.base_url, api_key="unused",
                  messages=HELLO, max_tokens=8, temperature=0)
    response = litellm.completion(**kwargs)
    text = response.choices[0].message.content
    assert text
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **kwargs))
    assert streamed == text


def test_completions_stream_carries_null_usage_until_the_last_chunk(clients_server: ServerProcess) -> None:
    r = _post(clients_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    chunks = _sse(r)
    assert all(c["usage"] is None and c["system_fingerprint"].startswith("fh-") for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    plain = _sse(_post(clients_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "stream": True}))
    assert all("usage" not in c for c in plain)


def test_echo_logprobs_through_the_openai_client(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    """What lm-evaluation-harness's local-completions sends for a loglikelihood task."""
    prompt = "The capital of France is Paris"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == prompt
    assert len(choice.logprobs.tokens) == len(tokenizer.encode(prompt)) == r.usage.prompt_tokens
    assert choice.logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert r.usage.completion_tokens == 0
