"""Poison requests among 16 concurrent normal streams (issue 13, item 1): every normal stream completes with the
text it gets without them; each poison request gets its own 4xx (before admission) or its own error event / 400
(when it fails mid-generation), naming nothing of the other requests; the server stays healthy."""
from __future__ import annotations

import asyncio
import json

import httpx

from tests.integration.conftest import MODEL_NAME, ServerProcess

NUM_NORMAL = 16
MAX_TOKENS = 24
QUESTIONS = ["Write a haiku about the sea.", "What is 17 times 3?", "Why is the sky blue?", "Name a cat.",
             "Translate 'good morning' into French.", "List three prime numbers.", "What is Python?",
             "Give me a word that rhymes with tree."]
IMPOSSIBLE_STRING = {"type": "object", "properties": {"code": {"type": "string", "pattern": "[^\\s\\S]"}},
                     "required": ["code"]}
# (name, extra body fields, stream, what its error says): each must fail alone
POISON = [
    ("empty regex", {"guided_regex": "[^\\s\\S]"}, True, "language is empty"),
    ("empty regex, not streamed", {"guided_regex": "[^\\s\\S]"}, False, "language is empty"),
    ("schema with an impossible required string", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": IMPOSSIBLE_STRING}}}, True, "language is empty"),
    ("tiny repetition penalty with a grammar", {"repetition_penalty": 1e-300, "guided_choice": ["yes", "no"]}, True,
     "repetition_penalty"),
    # branches first (so it passes the compile-time check), then allows nothing: fails mid-generation
    ("grammar that dead-ends after its first character", {"guided_regex": "[ab][^\\s\\S]"}, True,
     "exclude every token"),
    ("grammar that dead-ends, not streamed", {"guided_regex": "[ab][^\\s\\S]"}, False, "exclude every token"),
]


def _body(question: str, stream: bool, **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": stream, **extra}


async def _normal(client: httpx.AsyncClient, question: str) -> str:
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=_body(question, True)) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, f"a normal stream got an error: {event}"
            for choice in event["choices"]:
                text += choice["delta"].get("content") or ""
    return text


async def _poison(client: httpx.AsyncClient, extra: dict, stream: bool) -> tuple[int, str]:
    """(status, error message): the 4xx body's, or the error event's of a stream that failed mid-way."""
    if not stream:
        response = await client.post("/v1/chat/completions", json=_body("Say something.", False, **extra))
        return response.status_code, response.json().get("error", {}).get("message", "")
    async with client.stream("POST", "/v1/chat/completions", json=_body("Say something.", True, **extra)) as response:
        if response.status_code != 200:
            return response.status_code, json.loads(await response.aread())["error"]["message"]
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    errors = [json.loads(line[6:])["error"] for line in lines if line != "data: [DONE]" and '"error"' in line]
    assert lines[-1] == "data: [DONE]"
    return (400 if errors else 200), (errors[0]["message"] if errors else "")


def test_poison_requests_fail_alone_among_concurrent_streams(server: ServerProcess) -> None:
    questions = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else " Briefly.")
                 for i in range(NUM_NORMAL)]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            # the reference: the same 16 streams together without the poison requests (the fp32 server's greedy
            # text does not depend on the batch: test_server_concurrency.py checks that against each run alone),
            # one batched run instead of 16 in a row
            clean = await asyncio.gather(*[_normal(client, q) for q in questions])
            together = await asyncio.gather(*[_normal(client, q) for q in questions],
                                            *[_poison(client, extra, stream) for _, extra, stream, _ in POISON])
            health = await client.get("/health")
            return clean, together, health

    clean, together, health = asyncio.run(main())
    assert together[:NUM_NORMAL] == clean, "a normal stream's text changed when poison requests ran beside it"
    for (name, _, _, expected), (status, message) in zip(POISON, together[NUM_NORMAL:]):
        assert 400 <= status < 500, f"{name}: got {status} {message!r}"
        assert expected in message and "batch row" not in message, f"{name}: {message!r}"
    assert health.status_code == 200
    state = server.wait_idle()
    assert state["kv_blocks_used"] == 0 and state["num_running"] == 0
