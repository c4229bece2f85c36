"""Black-box tests of the OpenAI API through the official `openai` client: responses, streaming invariants,
stop strings, n, seeds, lengths, logprobs and prefix-cache usage."""
from __future__ import annotations

import httpx
import openai
import pytest
from pydoc_data.topics import topics

from tests.integration.conftest import MODEL_NAME, ServerProcess

CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL_NAME
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_text_parts_and_system_message(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Name three"},
                                             {"type": "text", "text": " colors."}]}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens <= 4


def test_completion_length_and_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.choices[0].text


def test_completion_prompt_forms(client: openai.OpenAI) -> None:
    ids = client.completions.create(model=MODEL_NAME, prompt=[504, 3575, 282], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3
    many = client.completions.create(model=MODEL_NAME, prompt=["One", "Two"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both completions of prompt 0 agree


def test_chat_stream_invariants(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=6, temperature=0)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completion_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0,
                                            stream=True))
    assert len({c.id for c in chunks}) == 1 and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(client: openai.OpenAI, stream: bool) -> None:
    prompt = "List the days of the week: Monday, Tuesday,"
    full = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 - 1: len(full) // 2 + 2]  # three characters from the middle, often across tokens
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "@@@"],
                                  stream=stream)
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[:full.index(stop)] and reason == "stop"


def test_n_two_streams_both_choices(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=1.0,
                                                 seed=7, n=2, stream=True))
    first = {}
    for c in chunks:
        for ch in c.choices:
            first.setdefault(ch.index, ch.delta.role)
    assert first == {0: "assistant", 1: "assistant"}
    finished = sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason)
    assert finished == [0, 1]
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=1.0, seed=7, n=2)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens <= 10


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10,
                                         temperature=1.0, seed=seed).choices[0].text
    assert sample(1234) == sample(1234)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 2
        assert tok.top_logprobs[0].logprob == pytest.approx(tok.logprob, abs=1e-4)  # greedy picks the top token


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0


def test_cached_tokens_on_repeated_prompt(client: openai.OpenAI) -> None:
    prompt = topics["if"][:1200]
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0)
    second = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens > 100
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_metrics_and_openapi(server: ServerProcess) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("freehold_num_requests_running", "freehold_num_requests_waiting", "freehold_kv_cache_usage_ratio",
                 "freehold_prompt_tokens_total", "freehold_generation_tokens_total",
                 "freehold_time_to_first_token_seconds_bucket", "freehold_inter_token_latency_seconds_bucket",
                 "freehold_prefix_cache_queries_total", "freehold_prefix_cache_hits_total",
                 "freehold_num_preemptions_total"):
        assert name in text, name
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


def test_reset_prefix_cache(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/admin/reset_prefix_cache")
    assert r.status_code == 200 and r.json()["num_blocks_reset"] >= 0


def test_multi_turn_chat_reuses_previous_turns(client: openai.OpenAI, server: ServerProcess) -> None:
    """Turn N's prompt starts with turn N-1's prompt and reply: cached_tokens covers at least the previous
    prompt's full 16-token blocks."""
    httpx.post(f"{server.url}/admin/reset_prefix_cache")
    messages = [{"role": "system", "content": "You are a terse assistant. " + topics["if"][:400]}]
    previous_prompt = 0
    for turn, question in enumerate(["What is an if statement?", "And elif?", "Give an example."]):
        messages.append({"role": "user", "content": question})
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
        cached = r.usage.prompt_tokens_details.cached_tokens
        if turn == 0:
            assert cached == 0
        else:
            assert cached >= previous_prompt // 16 * 16 > 0, (turn, cached, previous_prompt)
            assert cached < r.usage.prompt_tokens
        previous_prompt = r.usage.prompt_tokens
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
