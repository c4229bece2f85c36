"""Many clients at once: concurrent greedy streams match the same requests run alone, and clients that go away
mid-stream leave nothing running and no KV block referenced."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import openai
from pydoc_data.topics import topics

from tests.integration.conftest import MODEL_NAME, ServerProcess

NUM_CLIENTS = 32
MAX_TOKENS = 16
PROMPTS = [
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "What is 17 times 3?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Summarize this: " + topics["while"][:600]}],
    [{"role": "user", "content": "Translate 'good morning' into French."}],
    [{"role": "user", "content": "Give me a name for a cat."}],
    [{"role": "user", "content": "Explain this code: " + topics["for"][:900]}],
    [{"role": "user", "content": "List three prime numbers."}],
]


@dataclass
class Run:
    text: str = ""
    finish_reason: str = ""
    num_tokens: int = 0
    tokens: list[str] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logprob at each step


async def _stream(client: openai.AsyncOpenAI, messages: list[dict]) -> Run:
    stream = await client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True, logprobs=True, top_logprobs=2,
                                                  stream_options={"include_usage": True})
    run = Run()
    async for chunk in stream:
        for choice in chunk.choices:
            run.text += choice.delta.content or ""
            run.finish_reason = choice.finish_reason or run.finish_reason
            for tok in choice.logprobs.content if choice.logprobs else []:
                run.tokens.append(tok.token)
                run.margins.append(tok.top_logprobs[0].logprob - tok.top_logprobs[1].logprob)
        if chunk.usage is not None:
            run.num_tokens = chunk.usage.completion_tokens
    return run


def test_concurrent_greedy_streams_match_alone(server: ServerProcess) -> None:
    async def main() -> tuple[list[Run], list[Run]]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                                      timeout=300) as client:
            alone = [await _stream(client, p) for p in PROMPTS]
            together = await asyncio.gather(*(_stream(client, PROMPTS[i % len(PROMPTS)])
                                              for i in range(NUM_CLIENTS)))
            return alone, list(together)

    alone, together = asyncio.run(main())
    for run in alone + together:
        assert run.finish_reason in ("stop", "length") and run.num_tokens == len(run.tokens) >= 1
    for i, run in enumerate(together):
        ref = alone[i % len(PROMPTS)]
        assert (run.tokens, run.text, run.finish_reason) == (ref.tokens, ref.text, ref.finish_reason), \
            f"client {i}: together {run.text!r} vs alone {ref.text!r}"
    assert server.wait_idle()["kv_blocks_used"] == 0


def test_disconnects_abort_and_free_kv(server: ServerProcess) -> None:
    body = {"model": MODEL_NAME, "prompt": "Count from one to one thousand: one, two,", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}

    async def drop_after_a_few_chunks(client: httpx.AsyncClient) -> int:
        num_chunks = 0
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    json.loads(line.removeprefix("data: "))
                    num_chunks += 1
                    if num_chunks == 3:
                        break  # leaving the context closes the connection mid-stream
        return num_chunks

    async def drop_a_non_streaming_request(client: httpx.AsyncClient) -> None:
        try:
            await client.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=1.5)
        except httpx.TimeoutException:
            return
        raise AssertionError("the non-streaming request finished before the client gave up")

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            results = await asyncio.gather(*(drop_after_a_few_chunks(client) for _ in range(4)),
                                           drop_a_non_streaming_request(client))
            assert results[:4] == [3, 3, 3, 3]

    asyncio.run(main())
    start = time.monotonic()
    state = server.wait_idle(timeout_s=5)
    assert state["num_running"] == 0 and state["num_waiting"] == 0, state
    assert state["kv_blocks_used"] == 0, state
    assert time.monotonic() - start < 5
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'freehold_requests_total{finish_reason="abort"}' in metrics
