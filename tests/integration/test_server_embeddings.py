"""POST /v1/embeddings on the real server (the session `server` loads the bundled MiniLM by default), through the
official `openai` client and raw httpx: vectors equal `Embedder().embed` of the same input, OpenAI's error shape
for bad input, and concurrent requests batched together without changing any vector."""
from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from freehold.embed import Embedder
from tests.integration.conftest import API_KEY

NAME = "all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "Ça va très bien, merci !", "retrieval augmented generation"]
LONG = "word " * 400  # 402 tokens: cut at 256


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/embeddings", json=body, headers=server.headers(), timeout=60)


def vectors_of(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def test_float_vectors_equal_the_python_api(client, embedder):
    response = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    expected = embedder.embed(TEXTS)
    assert response.model == NAME and [d.index for d in response.data] == [0, 1, 2]
    assert np.abs(vectors_of(response) - expected.vectors).max() < 1e-6
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(expected.num_tokens)


def test_base64_vectors_equal_the_python_api(client, embedder):
    expected = embedder.embed(TEXTS).vectors
    raw = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    assert np.abs(decoded - expected).max() < 1e-6
    by_default = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
    assert np.abs(vectors_of(by_default) - expected).max() < 1e-6


def test_token_id_inputs(client, embedder):
    ids = [embedder.encode_tokens(t) for t in TEXTS]
    one = client.embeddings.create(model=NAME, input=ids[0], encoding_format="float")
    many = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    expected = embedder.embed(TEXTS).vectors
    assert np.abs(vectors_of(one)[0] - expected[0]).max() < 1e-6
    assert np.abs(vectors_of(many) - expected).max() < 1e-6


def test_native_dimensions_and_user_are_accepted_without_model(server, embedder):
    response = post(server, {"input": TEXTS, "dimensions": 384, "user": "u-1"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == NAME and len(response.json()["data"][0]["embedding"]) == 384


def test_truncated_inputs_are_named_in_a_header_or_refused(server, embedder):
    response = post(server, {"input": [TEXTS[0], LONG, TEXTS[1], LONG]})
    assert response.status_code == 200 and response.headers["X-Freehold-Truncated-Inputs"] == "1, 3"
    assert response.json()["usage"]["prompt_tokens"] == sum(embedder.embed([TEXTS[0], LONG, TEXTS[1], LONG]).num_tokens)
    assert "X-Freehold-Truncated-Inputs" not in post(server, {"input": TEXTS}).headers
    refused = post(server, {"input": [TEXTS[0], LONG], "truncate": False})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    assert "input[1]" in refused.json()["error"]["message"]


@pytest.mark.parametrize("body, param, needle", [
    ({"input": []}, "input", "empty"),
    ({"input": ""}, "input", "empty string"),
    ({"input": ["ok", ""]}, "input", "input[1] is an empty string"),
    ({"input": ["x"] * 2049}, "input", "at most 2048"),
    ({"input": ["x"] * 10000}, "input", "at most 2048"),
    ({"input": ["text", 3]}, "input", "wrong type"),
    ({"input": [[101, 10 ** 9]]}, "input", "not a token id"),
    ({"input": "x", "dimensions": 128}, "dimensions", "384"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({}, "input", "required"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param, needle):
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and needle in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"


def test_concurrent_requests_are_all_answered_with_their_own_vectors(server, embedder):
    texts = [f"request number {i}: " + "some words " * (i * 7) for i in range(16)]
    singles = embedder.embed(texts).vectors
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda t: post(server, {"input": t, "encoding_format": "float"}), texts))
    assert all(r.status_code == 200 for r in responses)
    got = np.array([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
    assert np.abs(got - singles).max() < 1e-6


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_the_route_without_v1_the_metrics_and_the_schema(server):
    requests = _metric(server, "freehold_embedding_requests_total")
    tokens = _metric(server, "freehold_embedding_tokens_total")
    assert httpx.post(f"{server.url}/embeddings", json={"input": ["hello world", "x"]}, timeout=30).status_code == 200
    assert _metric(server, "freehold_embedding_requests_total") == requests + 1
    assert _metric(server, "freehold_embedding_tokens_total") == tokens + 4 + 3
    paths = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    assert "/v1/embeddings" in paths and "/embeddings" not in paths


def test_the_api_key_applies(keyed_server):
    url = f"{keyed_server.base_url}/embeddings"
    assert httpx.post(url, json={"input": "x"}, timeout=30).status_code == 401
    assert httpx.post(url, json={"input": "x"}, headers=keyed_server.headers(), timeout=30).status_code == 200
    assert keyed_server.api_key == API_KEY


# `--embedding-model none` (no embeddings route, a 404 naming the flag): checked on the server that
# test_server_conversations.py's kill -9 test starts with that flag, instead of a server start of its own here
