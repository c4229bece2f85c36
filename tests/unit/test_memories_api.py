"""/v1/memories through a test client (no model), and a Responses request's context plan on the server side
(freehold.server.response_context) over a real store: budget, report, memories recalled by namespace."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from freehold.errors import InvalidRequestError
from freehold.memory.context import SUMMARY_HEADER, Summary
from freehold.memory.items import message_item
from freehold.memory.memories import MemoryStore
from freehold.memory.store import ConversationStore
from freehold.server.app import create_app
from freehold.server.conversations import Conversations
from freehold.server.limits import ServerLimits
from freehold.server.response_context import (RecallIndexes, SummaryTasks, plan_context, requested_budget,
                                              summary_max_tokens, write_summary)
from freehold.server.responses_input import stored_items, typed_parts
from freehold.server.responses_protocol import ResponsesRequest


@pytest.fixture
def api(tmp_path) -> TestClient:
    serving = SimpleNamespace(limits=ServerLimits(), retrieval=None, strict_api=False, check_fields=lambda body: {},
                              conversations=Conversations(ConversationStore(tmp_path / "c.sqlite")))
    return TestClient(create_app(serving, ui=False))


def test_memories_are_added_listed_by_namespace_and_deleted(api):
    first = api.post("/v1/memories", json={"text": "The staging cluster runs in Frankfurt."}).json()
    assert first["object"] == "memory" and first["namespace"] == "default" and first["id"].startswith("mem_")
    api.post("/v1/memories", json={"text": "Prefers vim.", "namespace": "alice"})
    assert [m["text"] for m in api.get("/v1/memories").json()["data"]] == ["The staging cluster runs in Frankfurt."]
    assert [m["text"] for m in api.get("/v1/memories", params={"namespace": "alice"}).json()["data"]] == \
        ["Prefers vim."]
    assert api.delete(f"/v1/memories/{first['id']}").json() == {"id": first["id"], "object": "memory.deleted",
                                                                 "deleted": True}
    assert api.get("/v1/memories").json()["data"] == []
    missing = api.delete(f"/v1/memories/{first['id']}")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "memory_id"


@pytest.mark.parametrize("body, param", [({"text": ""}, "text"), ({"text": "x" * 4001}, "text"),
                                         ({"text": "x", "namespace": ""}, "namespace"), ({}, "text")])
def test_bad_memories_are_400s_naming_the_field(api, body, param):
    r = api.post("/v1/memories", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_memories_need_a_data_dir():
    serving = SimpleNamespace(limits=ServerLimits(), retrieval=None, conversations=None)
    r = TestClient(create_app(serving, ui=False)).get("/v1/memories")
    assert r.status_code == 400 and "--data-dir none" in r.json()["error"]["message"]


def words(text: str) -> int:
    return len(text.split())


def _request(**fields) -> tuple[ResponsesRequest, object, list]:
    body = ResponsesRequest.model_validate({"input": "Which vault slot holds the deploy key?", **fields})
    parts = typed_parts([])
    return body, parts, stored_items(body.input, parts)


def test_a_memory_plan_reports_what_went_in_and_recalls_the_namespace(tmp_path):
    memories = MemoryStore(tmp_path / "c.sqlite")
    memories.add("ops", "The deploy key is stored in vault slot 7.")
    filler = "The interpreter reads statements and executes them in order, one after another. " * 3
    history = [message_item("user" if i % 2 == 0 else "assistant", f"{i}. {filler}", item_id=f"msg_{i}")
               for i in range(40)]
    body, parts, new = _request(instructions="Be brief.",
                                freehold={"context": {"budget_tokens": 400, "namespace": "ops"}})
    budget = requested_budget(body, max_model_len=2048)
    plan = plan_context(memories, RecallIndexes(), words, body, parts, history, new, budget, "conv_1", "conv_1")
    report = plan.report
    assert report.policy == "memory" and report.num_tokens <= 400 and report.budget_tokens == 400
    assert [p.source_id for p in report.recalled][:1] == [memories.list("ops")[0].id]
    assert report.items and [i.id for i in report.items] == [f"msg_{i}" for i in range(40 - len(report.items), 40)]
    assert report.num_dropped_items == 40 - len(report.items) > 0
    roles = [m["role"] for m in plan.messages]
    assert roles[0] == "system" and plan.messages[-1]["content"] == body.input
    assert "vault slot 7" in plan.messages[-2]["content"]  # the memory block just before the new input
    assert memories.context_state("conv_1").anchor == report.items[0].id  # the next turn starts from it


def test_truncation_auto_keeps_only_the_newest_items_and_bad_settings_are_400s(tmp_path):
    history = [message_item("user" if i % 2 == 0 else "assistant", "word " * 50, item_id=f"msg_{i}")
               for i in range(20)]
    body, parts, new = _request(truncation="auto", max_output_tokens=100)
    budget = requested_budget(body, max_model_len=300)
    assert budget.budget_tokens == 200 and budget.policy.value == "truncate"
    plan = plan_context(MemoryStore(tmp_path / "c.sqlite"), RecallIndexes(), words, body, parts, history, new,
                        budget, None, "resp_1")
    assert [i.id for i in plan.report.items] == ["msg_18", "msg_19"] and not plan.report.recalled
    assert requested_budget(_request()[0], 300) is None  # nothing asked: nothing dropped
    for fields, param in [({"truncation": "sometimes"}, "truncation"),
                          ({"freehold": {"context": {"budget_tokens": 301}}}, "freehold.context.budget_tokens")]:
        with pytest.raises(InvalidRequestError) as err:
            requested_budget(_request(**fields)[0], 300)
        assert err.value.param == param


def _summary_setup(tmp_path, budget_tokens: int, num_items: int = 20):
    memories = MemoryStore(tmp_path / "c.sqlite")
    history = [message_item("user" if i % 2 == 0 else "assistant", f"{i} " + "word " * 40, item_id=f"msg_{i}")
               for i in range(num_items)]
    body, parts, new = _request(freehold={"context": {"budget_tokens": budget_tokens}})
    budget = requested_budget(body, 2048)

    def plan():
        return plan_context(memories, RecallIndexes(), words, body, parts, history, new, budget, "conv_1", "conv_1")
    return memories, plan


def test_the_running_summary_is_written_from_the_dropped_turns_and_used_next_turn(tmp_path):
    memories, plan = _summary_setup(tmp_path, 500)
    first = plan()
    asked = []

    async def generate(messages, max_tokens):
        asked.append((messages[-1]["content"], max_tokens))
        return " The user discussed words. "
    asyncio.run(write_summary(memories, first, generate, words, 2048))
    last_dropped = first.assembly.dropped[-1].id
    assert "0 word" in asked[0][0]  # the dropped turns were shown to the model
    assert asked[0][1] == summary_max_tokens(first.budget, words) == 150 // 3 - words(SUMMARY_HEADER) - 4
    assert memories.context_state("conv_1").summary == Summary("The user discussed words.", last_dropped)
    after = plan()
    assert after.report.summary_tokens > 0 and after.report.summary_through == last_dropped
    assert after.messages[0]["content"].endswith("The user discussed words.")
    assert after.report.num_tokens <= 500
    asked.clear()
    asyncio.run(write_summary(memories, after, generate, words, 2048))
    assert asked == []  # nothing left the window since: no new summary


@pytest.mark.parametrize("budget_tokens", [1024, 2048])
def test_a_summary_as_long_as_it_may_be_fits_its_share_and_is_not_rewritten(tmp_path, budget_tokens):
    memories, plan = _summary_setup(tmp_path, budget_tokens, num_items=120)
    first, calls = plan(), []

    async def generate(messages, max_tokens):  # the longest summary the model may write
        calls.append(max_tokens)
        return "fact " * max_tokens
    asyncio.run(write_summary(memories, first, generate, words, 100_000))  # a prompt bound that holds every turn
    second = plan()
    full = words(SUMMARY_HEADER) + calls[0] + 4  # included whole, cut by nothing
    assert second.report.summary_tokens == full <= first.budget.summary_room < full + 8
    assert second.report.summary_through == first.assembly.dropped[-1].id
    asyncio.run(write_summary(memories, second, generate, words, 100_000))
    assert len(calls) == 1  # the same window: the stored summary covers it, nothing is summarized again


def test_a_long_backlog_is_summarized_oldest_first_within_the_prompt_bound(tmp_path):
    memories, plan = _summary_setup(tmp_path, 500, num_items=40)
    first, asked = plan(), []

    async def generate(messages, max_tokens):
        asked.append(sum(words(m["content"]) + 4 for m in messages))
        return f"summary {len(asked)}"
    dropped = [t.id for t in first.assembly.dropped]
    asyncio.run(write_summary(memories, first, generate, words, 300))
    through = memories.context_state("conv_1").summary.through
    assert through in dropped[:-1] and dropped.index(through) >= 1  # the oldest turns that fit, not the newest
    assert asked[0] + summary_max_tokens(first.budget, words) <= 300
    asyncio.run(write_summary(memories, plan(), generate, words, 300))  # the next turn goes on from there
    assert dropped.index(memories.context_state("conv_1").summary.through) > dropped.index(through)


def test_summary_tasks_run_one_per_conversation_one_at_a_time_and_none_when_closing():
    async def scenario():
        tasks, order, gate = SummaryTasks(), [], asyncio.Event()

        def write(name):
            async def run():
                order.append(f"{name} start")
                await gate.wait()
                order.append(f"{name} end")
            return run
        closing = [False]
        assert tasks.start("conv_a", write("a"), lambda: closing[0])
        assert not tasks.start("conv_a", write("a2"), lambda: closing[0])  # one per conversation
        assert tasks.start("conv_b", write("b"), lambda: closing[0])
        closing[0] = True
        assert not tasks.start("conv_c", write("c"), lambda: closing[0])
        closing[0] = False
        await asyncio.sleep(0.01)
        assert order == ["a start"]  # b waits for the one slot
        gate.set()
        while len(tasks):
            await asyncio.sleep(0.01)
        assert order == ["a start", "a end", "b start", "b end"]
        assert tasks.start("conv_a", write("a3"), lambda: True) is False
        assert tasks.start("conv_a", write("a4"), lambda: False)  # done: the conversation may start another
    asyncio.run(scenario())


def test_the_server_starts_without_the_retrieval_extra_and_memory_requests_say_what_to_install():
    import subprocess
    import sys
    code = """
import sys
sys.modules["bm25s"] = None  # `import bm25s` fails, as when the retrieval extra is not installed
sys.modules["usearch"] = None
import freehold.server.main
from freehold.errors import InvalidRequestError
from freehold.server.response_context import requested_budget
from freehold.server.responses_protocol import ResponsesRequest
assert "freehold.memory.recall" not in sys.modules
auto = ResponsesRequest.model_validate({"input": "hi", "truncation": "auto"})
assert requested_budget(auto, 2048).policy.value == "truncate"
try:
    requested_budget(ResponsesRequest.model_validate({"input": "hi", "freehold": {"context": {}}}), 2048)
except InvalidRequestError as exc:
    print(exc.param, exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("freehold.context.policy ") and "pip install 'freehold[retrieval]'" in out.stdout
