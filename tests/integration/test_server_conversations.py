"""Stored responses and conversations through the official openai client: store, retrieve and delete a response;
previous_response_id (the model sees exactly what a stateless request with the same items would show it); the
Conversations API and responses appended to a conversation; two concurrent turns on one conversation, serialized;
the 404 / 400 cases (an earlier output item sent back as input, too); a server's data directory after `kill -9`
mid-turn holding exactly the committed turns (that server, started with --embedding-model none, also shows the
embeddings route off); and `freehold chat --session` resumed across two runs."""
from __future__ import annotations

import io
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from freehold.memory.items import message_item, message_text
from freehold.memory.store import FILENAME, ConversationStore, Turn
from tests.integration.conftest import MODEL_NAME, ServerProcess, start_server

SMALL = {"model": MODEL_NAME, "max_output_tokens": 6, "temperature": 0}


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _texts(items: Any) -> list[str | None]:
    return [message_text(i if isinstance(i, dict) else i.model_dump()) for i in items]


def test_a_stored_response_is_retrieved_listed_and_deleted(client: openai.OpenAI) -> None:
    made = client.responses.create(input="Name a color.", **SMALL)
    assert made.store is True  # the default, as on OpenAI
    got = client.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text and got.usage == made.usage
    assert _texts(client.responses.input_items.list(made.id).data) == ["Name a color."]
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_previous_response_id_shows_the_model_the_earlier_turn(client: openai.OpenAI) -> None:
    first = client.responses.create(input="My name is Ada.", **SMALL)
    second = client.responses.create(input="What is my name?", previous_response_id=first.id, **SMALL)
    assert second.previous_response_id == first.id
    assert _texts(client.responses.input_items.list(second.id, order="asc").data) == \
        ["My name is Ada.", first.output_text, "What is my name?"]
    # the same items sent statelessly: the same prompt (token count) and the same greedy answer
    items = [{"role": "user", "content": "My name is Ada."}, *[o.model_dump() for o in first.output],
             {"role": "user", "content": "What is my name?"}]
    stateless = client.responses.create(input=items, store=False, **SMALL)
    alone = client.responses.create(input="What is my name?", store=False, **SMALL)
    assert second.usage.input_tokens == stateless.usage.input_tokens > alone.usage.input_tokens
    assert second.output_text == stateless.output_text


def test_a_response_in_a_conversation_reads_and_extends_it(client: openai.OpenAI) -> None:
    conv = client.conversations.create(items=[{"role": "user", "content": "Remember the number 7."}],
                                       metadata={"topic": "numbers"})
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "numbers"}
    added = client.conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Noted."}]}])
    assert _texts(added.data) == ["Noted."]
    made = client.responses.create(input="Which number?", conversation=conv.id, **SMALL)
    assert made.conversation.id == conv.id
    listed = client.conversations.items.list(conv.id, order="asc")
    assert _texts(listed.data) == ["Remember the number 7.", "Noted.", "Which number?", made.output_text]
    assert listed.data[-1].id == made.output[0].id
    again = client.responses.create(input="Say it again.", conversation={"id": conv.id}, **SMALL)
    assert again.usage.input_tokens > made.usage.input_tokens + made.usage.output_tokens
    assert len(client.conversations.items.list(conv.id).data) == 6
    first_id = listed.data[0].id
    assert message_text(client.conversations.items.retrieve(first_id, conversation_id=conv.id).model_dump()) == \
        "Remember the number 7."
    client.conversations.items.delete(first_id, conversation_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(first_id, conversation_id=conv.id)
    assert client.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    assert client.responses.retrieve(made.id).output_text == made.output_text  # responses outlive it


def test_concurrent_turns_on_one_conversation_run_one_after_the_other(client: openai.OpenAI) -> None:
    conv = client.conversations.create()
    results: dict[str, Any] = {}

    def turn(text: str) -> None:
        results[text] = client.responses.create(input=text, conversation=conv.id, **SMALL)

    threads = [threading.Thread(target=turn, args=(t,)) for t in ("Count to three.", "Name a fruit.")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    items = client.conversations.items.list(conv.id, order="asc").data
    texts = _texts(items)
    assert len(texts) == 4 and set(texts[0::2]) == set(results)  # each input followed by its own answer
    first, second = (results[texts[0]], results[texts[2]])
    assert texts[1] == first.output_text and texts[3] == second.output_text
    # the later turn saw the earlier one: its prompt holds the earlier input and output (and the template's tokens)
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_unknown_ids_unstored_responses_and_limits_are_clear_errors(server: ServerProcess,
                                                                      client: openai.OpenAI) -> None:
    url = f"{server.base_url}/responses"
    body = {"input": "x", **SMALL}
    assert _error(httpx.post(url, json={**body, "previous_response_id": "resp_nope"}, timeout=60),
                  404)["param"] == "previous_response_id"
    assert _error(httpx.post(url, json={**body, "conversation": "conv_nope"}, timeout=60), 404)["param"] == \
        "conversation"
    unstored = client.responses.create(input="x", store=False, **SMALL)
    error = _error(httpx.post(url, json={**body, "previous_response_id": unstored.id}, timeout=60), 400)
    assert "store=false" in error["message"] and error["param"] == "previous_response_id"
    conv = client.conversations.create()
    assert _error(httpx.post(url, json={**body, "conversation": conv.id, "previous_response_id": unstored.id},
                             timeout=60), 400)["param"] == "conversation"
    # earlier output items sent back with previous_response_id (input += response.output): refused before the run
    made = client.responses.create(input="Name a color.", **SMALL)
    again = [{"role": "user", "content": "And another?"}, *[o.model_dump() for o in made.output]]
    error = _error(httpx.post(url, json={**body, "input": again, "previous_response_id": made.id}, timeout=60), 400)
    assert error["param"] == "input[1].id" and "duplicate" in error["message"]
    assert _error(httpx.get(f"{server.base_url}/conversations/{conv.id}/items/msg_nope", timeout=60), 404)
    # a conversation longer than the context: a 400 naming the sizes
    client.conversations.items.create(conv.id, items=[{"role": "user", "content": "word " * 2500}])
    error = _error(httpx.post(url, json={**body, "conversation": conv.id}, timeout=60), 400)
    assert error["code"] == "context_length_exceeded" and "2048" in error["message"], error
    # the hard limit on a conversation's items (StoreLimits: 1000)
    full = client.conversations.create()
    for _ in range(50):
        client.conversations.items.create(full.id, items=[{"role": "user", "content": "x"}] * 20)
    with pytest.raises(openai.BadRequestError, match="1001 items"):
        client.conversations.items.create(full.id, items=[{"role": "user", "content": "x"}])
    error = _error(httpx.post(url, json={**body, "conversation": full.id}, timeout=60), 400)
    assert "1001 items" in error["message"] and error["param"] == "conversation"


# ---- kill -9 (a server of this module's own on one data directory) --------------------------------------------------
def _own_server(data_dir: str) -> ServerProcess:
    return start_server("--kv-cache-memory", "64M", "--max-model-len", "1024", "--embedding-model", "none",
                        "--no-ui", "--data-dir", data_dir)


def test_a_conversation_survives_kill_9_mid_turn() -> None:
    data_dir = tempfile.mkdtemp(prefix="freehold-conv-")
    first = _own_server(data_dir)
    try:
        # this server runs with --embedding-model none: the embeddings route is off, saying why (checked here,
        # not on a server of test_server_embeddings.py's own: one server start fewer)
        response = httpx.post(f"{first.base_url}/embeddings", json={"input": "x"}, timeout=30)
        assert response.status_code == 404 and "--embedding-model none" in response.json()["error"]["message"]
        c = openai.OpenAI(base_url=first.base_url, api_key="unused", max_retries=0, timeout=120)
        conv = c.conversations.create()
        kept = c.responses.create(input="Say hello.", conversation=conv.id, **SMALL)
        body = {"input": "Write a long story about the sea.", "conversation": conv.id, "stream": True,
                **SMALL, "max_output_tokens": 400}
        with httpx.stream("POST", f"{first.base_url}/responses", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line == "event: response.output_text.delta":
                    first.process.send_signal(signal.SIGKILL)  # mid-turn: text is streaming
                    break
        assert first.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.process.poll() is None:
            first.process.kill()
        first.log_path.unlink(missing_ok=True)
    # the file as the killed server left it, reopened (reopening a store is covered by the unit tests; a second
    # server start would cost ~15 s of CI): exactly the committed turn, nothing of the one in flight
    store = ConversationStore(Path(data_dir) / FILENAME)
    assert _texts(store.items(conv.id)) == ["Say hello.", kept.output_text]
    assert message_text(store.get_response(kept.id)["output"][0]) == kept.output_text
    store.check_integrity()
    store.commit_turn(Turn([message_item("user", "Say goodbye.")], [message_item("assistant", "Bye.")],
                           conversation_id=conv.id))  # and it takes the next turn
    assert len(store.items(conv.id)) == 4
    store.check_integrity()


# ---- freehold chat --session --------------------------------------------------------------------------------------
def test_chat_session_resumes_across_runs(tmp_path: Path, default_llm, monkeypatch, capsys) -> None:
    """Two runs of the CLI command (in this process, on the session's shared model: a model load per run would
    cost more than the rest of this module)."""
    from freehold import commands
    from freehold.cli import main
    monkeypatch.setattr(commands, "load_llm", lambda args: default_llm)

    def chat(line: str):
        monkeypatch.setattr("sys.stdin", io.StringIO(f"{line}\n"))
        code = main(["chat", "--session", "notes", "--data-dir", str(tmp_path), "--max-tokens", "8"])
        return code, capsys.readouterr()

    code, first = chat("My name is Ada.")
    assert code == 0 and "session 'notes': new" in first.err, first.err
    code, second = chat("What is my name?")
    assert code == 0 and "resumed with 2 earlier messages" in second.err, second.err
    store = ConversationStore(tmp_path / FILENAME)
    conv = store.find_conversation("freehold_session", "notes")
    texts = _texts(store.items(conv.id))
    assert texts[0::2] == ["My name is Ada.", "What is my name?"] and len(texts) == 4
    assert texts[3] and texts[3] in second.out
