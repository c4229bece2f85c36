"""Context assembly on the real server: a long conversation answered under `freehold.context` (memory policy, a
small budget) reports what went in, recalls the planted fact and a /v1/memories memory, stays within the budget,
and the next turn reuses the cached prefix."""
from __future__ import annotations

import httpx

from tests.integration.conftest import MODEL_NAME, ServerProcess

FILLER = "The interpreter reads each statement of the file and executes it in order, binding names as it goes. " * 3


def test_memory_context_reports_recall_and_cached_prefix(server: ServerProcess) -> None:
    post = lambda path, body: httpx.post(f"{server.base_url}{path}", json=body, timeout=120)  # noqa: E731
    items = [{"role": "user", "content": "Note for later: the deploy key is stored in vault slot 7."}]
    items += [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}. {FILLER}"} for i in range(1, 40)]
    conv = post("/conversations", {"items": items[:20]}).json()["id"]
    assert post(f"/conversations/{conv}/items", {"items": items[20:]}).status_code == 200
    memory = post("/memories", {"text": "The staging cluster runs in Frankfurt.", "namespace": "it-test"}).json()
    body = {"model": MODEL_NAME, "conversation": conv, "max_output_tokens": 4, "temperature": 0,
            "instructions": "Answer briefly.",
            "freehold": {"context": {"budget_tokens": 600, "namespace": "it-test"}}}
    first = post("/responses", {**body, "input": "Which vault slot holds the deploy key, and where is staging?"})
    assert first.status_code == 200, first.text
    report = first.json()["freehold"]["context"]
    assert report["policy"] == "memory" and report["num_tokens"] <= 600
    sources = [p["source_id"] for p in report["recalled"]]
    assert memory["id"] in sources and any("vault slot 7" in p["text"] for p in report["recalled"])
    assert report["items"] and report["num_dropped_items"] > 0
    assert first.json()["usage"]["input_tokens"] <= 600 + 40  # the template's own tokens are not budgeted
    # consecutive turns share instructions, summary and the recent window: the engine's prefix cache serves it. The
    # running summary is written in the background after a turn, so a turn may find a new one: then the next pair
    # (same summary on both) is compared.
    turns = [first.json()]
    for text in ("Thanks. And the staging cluster?", "And the vault slot again?", "Anything else?"):
        turns.append(post("/responses", {**body, "input": text}).json())
        before, after = (t["freehold"]["context"] for t in turns[-2:])
        if (before["summary_through"], before["summary_tokens"]) == (after["summary_through"], after["summary_tokens"]):
            break
    assert after["items"][0]["id"] == before["items"][0]["id"]  # the window kept its start
    shared = before["parts"]["instructions"] + before["parts"]["summary"] + before["parts"]["recent"]
    block = 16  # the engine's KV block: the cache matches whole blocks, and the budget's per-message count is rough
    assert turns[-1]["usage"]["input_tokens_details"]["cached_tokens"] >= shared - 2 * block > 0
