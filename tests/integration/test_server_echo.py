"""Legacy completions for eval harnesses, black-box: `echo` (with logprobs and max_tokens 0, as lm-evaluation-harness's
loglikelihood tasks send it), vLLM's `prompt_logprobs` on both endpoints, `best_of`, and the 400s for `suffix`,
best_of < n and best_of with stream. The key check: an echoed token's logprob equals the one it got when generated."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL_NAME, ServerProcess

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def post(server: ServerProcess, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": MODEL_NAME, **body}, timeout=120)


def test_echo_with_max_tokens_0_returns_only_the_prompts_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and len(lp.tokens) == r.usage.prompt_tokens > 3
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_echoed_logprobs_equal_the_generated_ones(server: ServerProcess, tokenizer) -> None:
    """Generate greedily with logprobs, then score prompt + generated ids with echo: the generated part's logprobs
    come back equal (different matmul paths: prefill rows vs decode rows, hence the tolerance)."""
    prompt_ids = tokenizer.encode(PROMPT)
    gen = post(server, "/completions", prompt=prompt_ids, max_tokens=12, temperature=0, logprobs=1,
               ignore_eos=True).json()["choices"][0]
    generated = gen["logprobs"]
    generated_ids = tokenizer.encode(gen["text"], add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in generated_ids] == generated["tokens"], "the text must round-trip"
    echo = post(server, "/completions", prompt=prompt_ids + generated_ids, max_tokens=0, echo=True,
                logprobs=1).json()["choices"][0]
    assert echo["text"] == tokenizer.decode(prompt_ids + generated_ids)
    scored = echo["logprobs"]
    tail = slice(len(prompt_ids), None)
    assert scored["tokens"][tail] == generated["tokens"]
    assert scored["token_logprobs"][tail] == pytest.approx(generated["token_logprobs"], abs=1e-3)
    for echoed, sampled in zip(scored["top_logprobs"][tail], generated["top_logprobs"]):
        assert echoed.keys() == sampled.keys()
        assert list(echoed.values()) == pytest.approx(list(sampled.values()), abs=1e-3)
    # greedy: every generated token is the most likely one, so its echoed logprob is its top-1 value
    for token, value, top in zip(scored["tokens"][tail], scored["token_logprobs"][tail], scored["top_logprobs"][tail]):
        assert top[token] == pytest.approx(value, abs=1e-6)


def test_echo_streams_the_prompt_first_and_echo_without_logprobs(server: ServerProcess, client: openai.OpenAI,
                                                                 tokenizer) -> None:
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0].startswith(PROMPT)
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert "".join(texts) == PROMPT + plain.choices[0].text
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == plain.usage.prompt_tokens + 3
    ids = tokenizer.encode(PROMPT)
    r = post(server, "/completions", prompt=ids, echo=True, max_tokens=3, temperature=0, ignore_eos=True).json()
    assert r["choices"][0]["text"] == tokenizer.decode(ids) + plain.choices[0].text
    assert r["choices"][0]["logprobs"] is None


def _check_vllm_prompt_logprobs(entries: list, prompt_ids: list[int], k: int) -> None:
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token_id, entry in zip(prompt_ids[1:], entries[1:]):
        assert str(token_id) in entry and len(entry) <= k + 1
        for value in entry.values():
            assert set(value) == {"logprob", "rank", "decoded_token"} and value["rank"] >= 1
        ranked = sorted(entry.values(), key=lambda v: -v["logprob"])
        assert ranked[0]["rank"] == 1


def test_prompt_logprobs_on_completions_match_echo(server: ServerProcess, tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    choice = post(server, "/completions", prompt=ids, max_tokens=1, echo=True, logprobs=1,
                  prompt_logprobs=2).json()["choices"][0]
    _check_vllm_prompt_logprobs(choice["prompt_logprobs"], ids, 2)
    echoed_logprobs = choice["logprobs"]["token_logprobs"]
    for token_id, entry, echoed in zip(ids[1:], choice["prompt_logprobs"][1:], echoed_logprobs[1:]):
        assert entry[str(token_id)]["logprob"] == pytest.approx(echoed, abs=1e-6)
    assert len(choice["logprobs"]["top_logprobs"][1]) == 1  # echo keeps its own k


def test_prompt_logprobs_on_chat(server: ServerProcess, tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    r = post(server, "/chat/completions", messages=messages, max_tokens=2, prompt_logprobs=1)
    body = r.json()
    assert r.status_code == 200, body
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                           add_special_tokens=False)
    _check_vllm_prompt_logprobs(body["prompt_logprobs"], ids, 1)
    assert body["usage"]["prompt_tokens"] == len(ids) and body["choices"][0]["message"]["content"] is not None
    assert post(server, "/chat/completions", messages=messages, max_tokens=2).json()["prompt_logprobs"] is None


def test_best_of_returns_the_samples_with_the_highest_mean_logprob(client: openai.OpenAI) -> None:
    """Seeded sampling depends on the seed and the completion index only, so best_of=4 draws the same four samples
    as n=4; it must return the two with the highest mean token logprob, best first."""
    options = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=11,
                   extra_body={"ignore_eos": True})
    four = client.completions.create(n=4, logprobs=0, **options)
    def mean(c):
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)
    ranked = sorted(four.choices, key=mean, reverse=True)
    assert mean(ranked[0]) > mean(ranked[-1]), "the samples should differ"
    best = client.completions.create(n=2, best_of=4, **options)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert best.choices[0].logprobs is None  # not asked for, though the ranking used them
    with_logprobs = client.completions.create(n=2, best_of=4, logprobs=0, **options)
    means = [mean(c) for c in with_logprobs.choices]
    assert means == sorted(means, reverse=True) and means[0] == pytest.approx(mean(ranked[0]), abs=1e-6)


@pytest.mark.parametrize("path,body,param", [
    ("/completions", {"prompt": PROMPT, "suffix": "!"}, "suffix"),
    ("/completions", {"prompt": PROMPT, "n": 3, "best_of": 2}, "best_of"),
    ("/completions", {"prompt": PROMPT, "n": 1, "best_of": 2, "stream": True}, "best_of"),
    ("/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": 1, "stream": True},
     "prompt_logprobs"),
])
def test_unsupported_combinations_are_400s_naming_the_field(server: ServerProcess, path, body, param) -> None:
    r = post(server, path, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_a_prompt_only_request_may_fill_the_whole_context(server: ServerProcess) -> None:
    """lm-evaluation-harness's rolling loglikelihood sends windows of exactly the model's length, max_tokens 0."""
    max_len = httpx.get(f"{server.base_url}/models", timeout=30).json()["data"][0]["max_model_len"]
    ids = [(7 * i) % 5000 + 100 for i in range(max_len)]
    body = {"model": MODEL_NAME, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}
    r = httpx.post(f"{server.base_url}/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == max_len
    r = httpx.post(f"{server.base_url}/completions", json={**body, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # no room left to generate


def test_echoed_logprobs_are_bounded_per_response(server: ServerProcess) -> None:
    body = {"model": MODEL_NAME, "prompt": ["word " * 1000] * 4, "echo": True, "logprobs": 20, "n": 16,
            "max_tokens": 0}
    r = httpx.post(f"{server.base_url}/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    assert "at most 200,000" in r.json()["error"]["message"]
    assert httpx.post(f"{server.base_url}/completions", json={**body, "n": 1, "logprobs": 1, "prompt": "word " * 50},
                      timeout=60).status_code == 200
