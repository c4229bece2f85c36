"""Per-request "kv_policy": "sink" over HTTP (freehold.kv.sink): a chat longer than the context streams on where
the server's window fits (the keyed server: --window 512, context 1024) and is a 400 where it does not (the shared
server: the default window 2048 overruns its 2048-token context)."""
import httpx

from tests.integration.conftest import MODEL_NAME, chat_400

LONG_CHAT = [{"role": "user", "content": "tell me more about the sea. " * 160}]  # about 1,100 tokens


def test_a_chat_longer_than_the_context_keeps_going_in_sink_mode(keyed_server):
    def chat(**body):
        return httpx.post(f"{keyed_server.base_url}/chat/completions", timeout=120, headers=keyed_server.headers(),
                          json={"model": MODEL_NAME, "messages": LONG_CHAT, "max_tokens": 4, **body})

    refused = chat()  # the full policy: too long
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded", refused.text
    r = chat(kv_policy="sink")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] > 1024 and body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "length"
    assert keyed_server.wait_idle()["kv_blocks_used"] == 0


def test_sink_is_refused_where_the_window_does_not_fit(server):
    error = chat_400(server, [{"role": "user", "content": "hi"}], {"kv_policy": "sink"})
    assert error["param"] == "kv_policy" and "not available" in error["message"], error
