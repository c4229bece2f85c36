"""freehold.memory.store without a model: conversations and their items, turns committed in one transaction (a
process killed inside one leaves nothing of it), response chains and input items, limits, deletion; and the
Conversations API over it (freehold.server.conversations) through a test client."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from freehold.errors import InvalidRequestError, NotFoundError
from freehold.memory.items import message_item, message_text
from freehold.memory.store import ConversationStore, ConversationTooLargeError, NotStoredError, StoreLimits, Turn
from freehold.server.app import create_app
from freehold.server.conversations import Conversations
from freehold.server.limits import ServerLimits


def _texts(items: list[dict]) -> list[str | None]:
    return [message_text(item) for item in items]


def _turn(store: ConversationStore, rid: str, question: str, answer: str, **links) -> None:
    store.commit_turn(Turn([message_item("user", question)], [message_item("assistant", answer)], response_id=rid,
                           response={"id": rid}, **links))


def test_a_conversation_keeps_its_items_in_order_across_reopening(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite")
    conv = store.create_conversation({"topic": "t"}, [message_item("user", "a")])
    store.add_items(conv.id, [message_item("assistant", "b")])
    _turn(store, "resp_1", "c", "d", conversation_id=conv.id)
    store.close()
    again = ConversationStore(tmp_path / "c.sqlite")
    assert _texts(again.items(conv.id)) == ["a", "b", "c", "d"]
    found = again.get_conversation(conv.id)
    assert found.metadata == {"topic": "t"} and found.num_items == 4
    assert again.find_conversation("topic", "t").id == conv.id and again.find_conversation("topic", "u") is None
    assert _texts(again.input_items("resp_1")) == ["a", "b", "c"]  # what the turn saw, and its own input
    again.check_integrity()


def test_response_chains_continue_and_unstored_ids_are_named(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite")
    _turn(store, "resp_1", "q1", "a1")
    _turn(store, "resp_2", "q2", "a2", previous_response_id="resp_1")
    assert _texts(store.continued_items("resp_2")) == ["q1", "a1", "q2", "a2"]
    assert _texts(store.input_items("resp_2")) == ["q1", "a1", "q2"]
    store.record_unstored("resp_x")
    with pytest.raises(NotStoredError, match="store=false"):
        store.continued_items("resp_x")
    with pytest.raises(NotFoundError):
        store.get_response("resp_nope")
    store.delete_response("resp_1")
    with pytest.raises(NotFoundError):
        store.get_response("resp_1")
    assert _texts(store.continued_items("resp_2")) == ["q2", "a2"]  # a deleted response ends the chain
    assert _texts(store.input_items("resp_2")) == ["q2"]  # (was a 404 naming resp_1)
    store.check_integrity()


def test_deleting_items_and_conversations_keeps_responses_whole(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite")
    conv = store.create_conversation(items=[message_item("user", "a", item_id="msg_a")])
    _turn(store, "resp_1", "q", "r", conversation_id=conv.id)
    with pytest.raises(InvalidRequestError, match="already holds"):
        store.add_items(conv.id, [message_item("user", "again", item_id="msg_a")])
    store.delete_item(conv.id, "msg_a")
    with pytest.raises(NotFoundError):
        store.get_item(conv.id, "msg_a")
    assert _texts(store.items(conv.id)) == ["q", "r"]
    store.delete_conversation(conv.id)
    with pytest.raises(NotFoundError):
        store.items(conv.id)
    assert _texts(store.input_items("resp_1")) == ["q"]  # the response keeps its own items
    store.check_integrity()


def test_limits_refuse_growth_past_them(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite", StoreLimits(max_items=3))
    conv = store.create_conversation(items=[message_item("user", str(i)) for i in range(3)])
    with pytest.raises(ConversationTooLargeError, match="4 items"):
        store.add_items(conv.id, [message_item("user", "x")])
    assert len(store.items(conv.id)) == 3  # the refused add left nothing
    with pytest.raises(ConversationTooLargeError):
        store.check_room(4, 10, "this conversation")


KILLED_MID_TURN = """
import os, sys
from freehold.memory.items import message_item
from freehold.memory.store import ConversationStore, Turn
store = ConversationStore(sys.argv[1])
conv = sys.argv[2]
real = store._insert_items
def insert_then_die(conn, items, **kw):
    real(conn, items, **kw)
    if kw.get("is_output"):
        os.kill(os.getpid(), 9)  # inside the turn's transaction: its inputs are written, not committed
store._insert_items = insert_then_die
store.commit_turn(Turn([message_item("user", "lost")], [message_item("assistant", "lost")], conversation_id=conv))
"""


def test_a_process_killed_inside_a_turn_leaves_nothing_of_it(tmp_path):
    path = tmp_path / "c.sqlite"
    store = ConversationStore(path)
    conv = store.create_conversation()
    store.commit_turn(Turn([message_item("user", "kept")], [message_item("assistant", "kept too")],
                           conversation_id=conv.id))
    done = subprocess.run([sys.executable, "-c", KILLED_MID_TURN, str(path), conv.id], timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9
    store.close()
    again = ConversationStore(path)
    assert _texts(again.items(conv.id)) == ["kept", "kept too"]
    again.check_integrity()


# ---- the Conversations API over the store (no model) ----------------------------------------------------------------
@pytest.fixture
def api(tmp_path) -> TestClient:
    serving = SimpleNamespace(limits=ServerLimits(), retrieval=None, strict_api=False, check_fields=lambda body: {},
                              conversations=Conversations(ConversationStore(tmp_path / "c.sqlite")))
    return TestClient(create_app(serving, ui=False))


def test_conversations_api_create_list_add_get_delete(api):
    made = api.post("/v1/conversations", json={"metadata": {"k": "v"},
                                               "items": [{"role": "user", "content": "hello"}]}).json()
    assert made["object"] == "conversation" and made["metadata"] == {"k": "v"}
    cid = made["id"]
    added = api.post(f"/v1/conversations/{cid}/items", json={"items": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
        {"role": "user", "content": "again"}]}).json()
    assert [i["role"] for i in added["data"]] == ["assistant", "user"]
    listed = api.get(f"/v1/conversations/{cid}/items", params={"order": "asc", "limit": 2}).json()
    assert [message_text(i) for i in listed["data"]] == ["hello", "hi"] and listed["has_more"]
    rest = api.get(f"/v1/conversations/{cid}/items",
                   params={"order": "asc", "after": listed["last_id"]}).json()
    assert [message_text(i) for i in rest["data"]] == ["again"] and not rest["has_more"]
    newest = api.get(f"/v1/conversations/{cid}/items", params={"limit": 1}).json()  # desc by default
    assert newest["data"][0]["content"] == [{"type": "input_text", "text": "again"}]
    item_id = newest["data"][0]["id"]
    assert api.get(f"/v1/conversations/{cid}/items/{item_id}").json()["id"] == item_id
    assert api.delete(f"/v1/conversations/{cid}/items/{item_id}").json()["id"] == cid
    assert api.get(f"/v1/conversations/{cid}/items/{item_id}").status_code == 404
    assert api.post(f"/v1/conversations/{cid}", json={"metadata": {"k": "w"}}).json()["metadata"] == {"k": "w"}
    assert api.delete(f"/v1/conversations/{cid}").json() == {"id": cid, "object": "conversation.deleted",
                                                             "deleted": True}
    gone = api.get(f"/v1/conversations/{cid}")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("body, param", [
    ({"items": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "items[0].content[0]"),
    ({"items": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "items[0].call_id"),
    ({"items": [{"role": "user", "content": "x"}] * 21}, "items"),
    ({"items": [{"role": "user", "content": "\ud800"}]}, "items[0].content"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"\ud800": "x" * 513}}, "metadata"),  # an over-long pair whose key cannot be printed
    ({"items": [{"id": "msg_1", "role": "user", "content": "a"}, {"id": "msg_1", "role": "user", "content": "b"}]},
     "items[1].id"),
])
def test_conversations_api_bad_bodies_are_400s_naming_the_field(api, body, param):
    r = api.post("/v1/conversations", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_server_without_a_data_dir_refuses_storage_with_a_400():
    serving = SimpleNamespace(limits=ServerLimits(), retrieval=None, conversations=None)
    r = TestClient(create_app(serving, ui=False)).post("/v1/conversations", json={})
    assert r.status_code == 400 and "--data-dir none" in r.json()["error"]["message"]


def test_an_item_id_the_conversation_holds_is_a_400_before_anything_is_added(api):
    cid = api.post("/v1/conversations", json={"items": [{"id": "msg_1", "role": "user", "content": "a"}]}).json()["id"]
    r = api.post(f"/v1/conversations/{cid}/items", json={"items": [{"role": "user", "content": "b"},
                                                                   {"id": "msg_1", "role": "user", "content": "c"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "items[1].id", r.text
    assert "already holds" in r.json()["error"]["message"]
    assert [message_text(i) for i in api.get(f"/v1/conversations/{cid}/items").json()["data"]] == ["a"]


def test_a_response_input_repeating_an_item_id_is_a_400_before_the_model_runs(tmp_path):
    """A client that sends earlier output items back (input += response.output) with `conversation` or
    previous_response_id, or one id twice: refused while opening the turn, naming input[i].id, lock released."""
    import asyncio

    from freehold.server.response_store import open_turn
    from freehold.server.responses_input import stored_items, typed_parts
    from freehold.server.responses_protocol import ResponsesRequest
    conversations = Conversations(ConversationStore(tmp_path / "c.sqlite"))
    serving = SimpleNamespace(conversations=conversations)
    conv = conversations.store.create_conversation(items=[message_item("user", "hi", item_id="msg_a")])
    conversations.store.commit_turn(Turn([message_item("user", "x", item_id="msg_in")],
                                         [message_item("assistant", "y", item_id="msg_out")], response_id="resp_1",
                                         response={"id": "resp_1"}))
    again = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "y"}]}

    async def opened(fields, items):
        body = ResponsesRequest.model_validate({"input": items, **fields})
        parts = typed_parts(items)
        return await open_turn(serving, body, stored_items(items, parts))

    async def scenario():
        cases = [({"conversation": conv.id}, [{"role": "user", "content": "q"}, {"id": "msg_a", **again}],
                  "input[1].id"),
                 ({"previous_response_id": "resp_1"}, [{"id": "msg_out", **again}], "input[0].id"),
                 ({}, [{"id": "msg_z", "role": "user", "content": "q"}, {"id": "msg_z", **again}], "input[1].id")]
        for fields, items, param in cases:
            with pytest.raises(InvalidRequestError) as err:
                await opened(fields, items)
            assert err.value.param == param, (fields, err.value)
        turn = await asyncio.wait_for(opened({"conversation": conv.id}, [{"role": "user", "content": "q"}]), 5)
        turn.release()  # the refused turn released the conversation's lock: this one got it
    asyncio.run(scenario())


def test_chat_sessions_need_storage_and_one_name_opens_one_conversation(tmp_path):
    import threading

    from freehold.memory.session import ChatSession
    with pytest.raises(InvalidRequestError, match="needs a data directory"):
        ChatSession.open("none", "notes")
    assert not (tmp_path / "none").exists() and not os.path.exists("none")
    opened, start = [], threading.Barrier(4)

    def open_session():
        start.wait()
        opened.append(ChatSession.open(tmp_path, "notes").conversation_id)
    threads = [threading.Thread(target=open_session) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(opened) == 4 and len(set(opened)) == 1  # found or created in one transaction: never two


def test_a_commit_under_way_when_the_client_leaves_finishes_before_the_lock_is_released(tmp_path):
    """finish_turn cancelled mid-commit (the client disconnected): the commit still lands, and the conversation's
    next writer gets the lock only after it."""
    import asyncio
    import threading

    from freehold.server.response_store import TurnState, finish_turn
    from freehold.server.responses_protocol import ResponseObject
    conversations = Conversations(ConversationStore(tmp_path / "c.sqlite"))
    conv = conversations.store.create_conversation()
    entered, go = threading.Event(), threading.Event()
    commit = conversations.store.commit_turn

    def slow_commit(turn):
        entered.set()
        go.wait(10)
        commit(turn)
    conversations.store.commit_turn = slow_commit
    response = ResponseObject(id="resp_1", created_at=0, status="completed", model="m", output=[],
                              tool_choice="auto", tools=[], parallel_tool_calls=True)

    async def scenario():
        release = await conversations.hold(conv.id)
        turn = TurnState(True, [], [message_item("user", "hi")], conversation_id=conv.id, release=release)
        finishing = asyncio.ensure_future(finish_turn(SimpleNamespace(conversations=conversations), turn, response))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        finishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await finishing
        turn.release()  # what the route does on the way out: the lock now waits for the commit
        next_writer = asyncio.ensure_future(conversations.hold(conv.id))
        await asyncio.sleep(0.05)
        assert not next_writer.done()
        go.set()
        (await asyncio.wait_for(next_writer, 10))()
        assert [message_text(i) for i in conversations.store.items(conv.id)] == ["hi"]
    asyncio.run(scenario())


def test_stored_calls_replay_even_when_cut_off_or_their_call_was_deleted(tmp_path):
    """A function_call cut off by max_output_tokens (partial arguments, status incomplete) is replayed with "{}",
    and an output whose call was deleted from the conversation is left out: neither makes later turns 400s. A
    client's own complete call with bad JSON still is one."""
    from freehold.server.responses_input import input_messages, stored_parts, typed_parts
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": "ab', "status": "incomplete",
            "id": "fc_1"}
    calls = [call, {"type": "function_call_output", "call_id": "c1", "output": "partial", "id": "fco_1"},
             {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}", "id": "fc_2"},
             {"type": "function_call_output", "call_id": "c2", "output": "done", "id": "fco_2"}]
    store = ConversationStore(tmp_path / "c.sqlite")
    conv = store.create_conversation(items=[message_item("user", "hi", item_id="msg_a"), *calls])
    store.delete_item(conv.id, "fc_2")
    history = stored_parts(store.items(conv.id))
    messages = input_messages(None, "next", typed_parts([]), history)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == "{}"
    # the same incomplete call sent back by a client is replayed alike; a complete one with bad JSON is a 400
    given = [call, {"type": "function_call_output", "call_id": "c1", "output": "x"}]
    assert input_messages(None, given, typed_parts(given))[0]["tool_calls"][0]["function"]["arguments"] == "{}"
    bad = [{**call, "status": "completed"}]
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        input_messages(None, bad, typed_parts(bad))
    orphan = [{"type": "function_call_output", "call_id": "c9", "output": "x"}]
    with pytest.raises(InvalidRequestError, match="no earlier"):
        input_messages(None, orphan, typed_parts(orphan))


def test_stored_call_arguments_that_decode_to_a_lone_surrogate_replay_as_empty():
    from freehold.server.responses_input import input_messages, stored_parts, typed_parts
    from freehold.tools.prompt import replayable_arguments
    assert [replayable_arguments(a) for a in ('{"x": 1}', '{"x": "\\ud800"}', "[1]", '{"x": ', "")] == [
        '{"x": 1}', "{}", "{}", "{}", "{}"]
    history = stored_parts([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": "\\ud800"}',
                             "id": "fc_1"}])
    assert input_messages(None, "next", typed_parts([]), history)[0]["tool_calls"][0]["function"]["arguments"] == "{}"
