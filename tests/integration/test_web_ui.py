"""The chat page at / in a real browser: Playwright drives Debian's `chromium` (scripts/setup.sh installs it;
Playwright's own browser download is never used) against the session's real `freehold serve` on the default model
(`server`) and its keyed sibling (`keyed_server`, for the API-key flow), both from tests/integration/conftest.py.

One browser for the module, a fresh context (empty localStorage) per test. Every test fails on a console error, an
uncaught page error or a JavaScript dialog, unless it names the exact console error it expects.
A screenshot lands in $FREEHOLD_TEST_ARTIFACTS (default: <tmp>/freehold-test-artifacts).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, sync_playwright

from tests.integration.conftest import API_KEY, ServerProcess

ARTIFACTS = Path(os.environ.get("FREEHOLD_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "freehold-test-artifacts"))
CHAT_URL = re.compile(r"/v1/chat/completions$")
HOSTILE = ('<img src=x onerror="window.__pwned=1;alert(1)"> <script>window.__pwned=2;alert(2)</script> '
           '[click me](javascript:alert(3)) <a href="javascript:alert(4)">raw link</a> '
           '<b onmouseover="alert(5)">bold</b> ![tracker](http://attacker.example/leak.png)')


class Watch:
    """What a page reports that a clean page never should: console errors, uncaught errors, dialogs."""

    def __init__(self, page: Page):
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def check(self, allowed: Callable[[str], bool] = lambda text: False) -> None:
        unexpected = [e for e in self.console_errors if not allowed(e)]
        assert (unexpected, self.page_errors, self.dialogs) == ([], [], [])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("no `chromium` on PATH: scripts/setup.sh installs Debian's (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


def open_page(browser: Browser, url: str) -> tuple[Page, Watch]:
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    page.set_default_timeout(20_000)
    watch = Watch(page)
    page.goto(url)
    return page, watch


@pytest.fixture
def chat(browser: Browser, server: ServerProcess) -> Iterator[tuple[Page, Watch]]:
    page, watch = open_page(browser, server.url)
    page.wait_for_function("() => document.getElementById('model-name').textContent.length > 0")
    yield page, watch
    page.context.close()


def set_settings(page: Page, **values: str) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    for name, value in values.items():
        page.fill(f"#set-{name}", value)


def send_and_wait(page: Page, text: str) -> Request:
    """Type `text`, press Enter, wait for the reply to finish; returns the chat request the page sent."""
    page.fill("#prompt", text)
    with page.expect_request(CHAT_URL) as request:
        page.press("#prompt", "Enter")
    wait_until_idle(page)
    return request.value


def wait_until_idle(page: Page) -> None:
    page.wait_for_selector("#stop", state="hidden")
    page.wait_for_function("() => !document.body.classList.contains('streaming') && "
                           "!document.body.classList.contains('syncing')")


def stored_messages(page: Page) -> list[dict]:
    conversations = json.loads(page.evaluate("localStorage.getItem('freehold.conversations')"))
    current = page.evaluate("localStorage.getItem('freehold.current')")
    return next(c for c in conversations if c["id"] == current)["messages"]


def abort_count(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(r'^freehold_requests_total\{finish_reason="abort"\} (\S+)$', text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# ---- the page -------------------------------------------------------------------------------------------------------
def test_page_has_a_strict_policy_labels_and_the_engine_gauge(browser, server):
    page, watch = open_page(browser, server.url)
    response = page.request.get(server.url)
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'SmolLM2-135M-Instruct'")
    state = server.engine_state()
    page.wait_for_function("() => /^\\d+ \\/ \\d+ blocks in use$/.test("
                           "document.getElementById('kv-blocks').textContent)")
    assert page.text_content("#kv-blocks").endswith(f"/ {state['kv_blocks_total']} blocks in use")
    assert re.fullmatch(r"\d+ running · \d+ waiting", page.text_content("#kv-requests"))
    page.click("#settings-toggle")
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select, meter')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map((e) => e.id)""")
    assert unlabeled == []
    watch.check()
    page.context.close()


def test_a_reply_streams_in_with_its_numbers_and_survives_a_reload(chat, server):
    page, watch = chat
    set_settings(page, max_tokens="24", temperature="0")
    # what arrives (each network chunk of the reply, read off a tee of its body) and what is shown, with times
    page.evaluate("""() => { window.__chunks = []; window.__lengths = [];
        const fetchReal = window.fetch;
        window.fetch = async (...args) => {
            const response = await fetchReal(...args);
            if (!String(args[0]).endsWith('/chat/completions')) return response;
            const [forPage, forTest] = response.body.tee();
            (async () => { const reader = forTest.getReader();
                for (;;) {
                    const { done } = await reader.read();
                    if (done) break;
                    window.__chunks.push(performance.now());
                }
            })();
            return new Response(forPage, response);
        };
        new MutationObserver(() => {
            const body = document.querySelector('article.assistant:last-of-type .body');
            if (body) window.__lengths.push([performance.now(), body.textContent.length]);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true}); }""")
    page.fill("#prompt", "Name three colors.")
    page.press("#prompt", "Shift+Enter")  # a new line, not a send
    page.keyboard.type("One line each.")
    assert page.input_value("#prompt") == "Name three colors.\nOne line each."
    assert page.locator("article").count() == 0
    with page.expect_request(CHAT_URL) as sent:
        page.press("#prompt", "Enter")
    wait_until_idle(page)
    body = sent.value.post_data_json
    assert body["max_tokens"] == 24 and body["temperature"] == 0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["processed_logprobs"] is True
    assert body["messages"] == [{"role": "user", "content": "Name three colors.\nOne line each."}]
    chunks = page.evaluate("window.__chunks")
    shown = [(t, n) for t, n in page.evaluate("window.__lengths") if n > 0]
    assert len(chunks) >= 3, chunks  # the server streamed the reply in pieces
    assert shown[0][0] < chunks[-1], (shown, chunks)  # and the page showed text before the last piece arrived
    assert [n for _, n in shown] == sorted(n for _, n in shown)
    meta = page.text_content("article.assistant .meta")
    numbers = re.fullmatch(r"TTFT \d+ ms · [\d.]+ tok/s · prompt (\d+) \(cached \d+\) · completion (\d+) · "
                           r"finish: (length|stop)", meta)
    assert numbers, meta
    tokens = stored_messages(page)[1]["tokens"]
    assert int(numbers.group(2)) == len(tokens) <= 24 and int(numbers.group(1)) > 10
    assert (numbers.group(3) == "length") == (len(tokens) == 24)
    assert page.text_content("article.assistant .body").strip()
    assert stored_messages(page)[1]["content"].strip()
    # kept on the server too: the chat's messages are the items of a server conversation
    server_id = page.get_attribute("#conversations .open[aria-current]", "data-server-id")
    items = httpx.get(f"{server.url}/v1/conversations/{server_id}/items", params={"order": "asc"}, timeout=30)
    texts = [(i["role"], i["content"][0]["text"]) for i in items.json()["data"]]
    assert texts == [(m["role"], m["content"]) for m in stored_messages(page)]
    page.reload()
    page.wait_for_selector("article.assistant")
    assert page.locator("article").count() == 2
    assert page.inner_text("article.user .body").strip() == "Name three colors.\nOne line each."
    assert (page.input_value("#set-max_tokens"), page.input_value("#set-temperature")) == ("24", "0")  # kept too
    watch.check()


def test_sampling_settings_reach_the_request_and_reshape_the_token_alternatives(chat):
    page, watch = chat
    set_settings(page, max_tokens="12", temperature="0.3", top_k="3", seed="7")
    body = send_and_wait(page, "Write one sentence about the sea.").post_data_json
    assert (body["temperature"], body["top_k"], body["seed"]) == (0.3, 3, 7)
    tokens = stored_messages(page)[1]["tokens"]
    assert len(tokens) == 12
    for token in tokens:  # at T = 0.3 over the top 3 the favourite only gains, and at most 3 tokens remain
        assert len(token["processedTop"]) <= 3
        assert token["processedTop"][0][1] >= token["top"][0][1] - 1e-6
    page.click("article.assistant .actions >> text=Tokens")
    page.locator("article.assistant button.token").nth(1).click()
    popover = page.locator("#alternatives")
    assert popover.is_visible()
    assert page.locator("#alternatives-raw li").count() == 5
    assert 1 <= page.locator("#alternatives-processed li").count() <= 3
    assert "after sampling settings" in page.text_content("#alternatives-title")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "web-ui.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    page.keyboard.press("Escape")  # closes the popover first
    assert popover.is_hidden()
    # a JSON Schema that is not JSON: the settings panel says so, nothing is sent, nothing of the chat changes
    sent = []
    page.on("request", lambda r: sent.append(r) if CHAT_URL.search(r.url) else None)
    set_settings(page, schema="{not json")
    page.fill("#prompt", "Answer yes or no.")
    page.press("#prompt", "Enter")
    assert "not valid JSON" in page.text_content("#settings-error")
    assert page.get_attribute("#set-schema", "aria-invalid") == "true"
    page.click("article.assistant .actions >> text=Regenerate")
    assert page.locator("article").count() == 2 and len(stored_messages(page)[1]["tokens"]) == 12
    assert page.input_value("#prompt") == "Answer yes or no." and sent == []
    # a valid one becomes the request's response_format, and the reply follows it
    schema = {"type": "string", "enum": ["yes", "no"]}
    set_settings(page, schema=json.dumps(schema))
    assert page.text_content("#settings-error") == ""
    with page.expect_request(CHAT_URL) as constrained:
        page.press("#prompt", "Enter")
    wait_until_idle(page)
    assert constrained.value.post_data_json["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "schema", "schema": schema, "strict": True}}
    assert json.loads(stored_messages(page)[3]["content"]) in ("yes", "no")
    watch.check()


def test_stop_mid_stream_ends_the_engine_request(chat, server):
    page, watch = chat
    set_settings(page, max_tokens="400", temperature="0")
    aborted = abort_count(server)
    page.fill("#prompt", "Tell me a long story about a dragon who learns to bake bread.")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => (document.querySelector('article.assistant .body')?.textContent.length ?? 0) > 0")
    # the gauge is live: within a poll it shows this request running and holding KV blocks
    page.wait_for_function("() => document.getElementById('kv-requests').textContent.startsWith('1 running')")
    assert int(page.text_content("#kv-blocks").split(" / ")[0]) > 0
    page.keyboard.press("Escape")
    wait_until_idle(page)
    assert "stopped" in page.text_content("article.assistant .meta")
    generated = stored_messages(page)[1]["stats"]["completionTokens"]
    assert 0 < generated < 400
    state = server.wait_idle()
    assert (state["num_running"], state["num_waiting"], state["kv_blocks_used"]) == (0, 0, 0)
    deadline = time.monotonic() + 10
    while abort_count(server) < aborted + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert abort_count(server) == aborted + 1  # the engine ended it as aborted, it did not run to max_tokens
    page.wait_for_function("() => document.getElementById('kv-blocks').textContent.startsWith('0 / ')")
    watch.check()


def test_regenerate_edit_and_new_chat(chat):
    page, watch = chat
    set_settings(page, max_tokens="6", temperature="1", seed="")
    send_and_wait(page, "Say hello.")
    with page.expect_request(CHAT_URL) as again:
        page.click("article.assistant .actions >> text=Regenerate")
    wait_until_idle(page)
    assert again.value.post_data_json["messages"] == [{"role": "user", "content": "Say hello."}]
    assert page.locator("article").count() == 2
    assert [m["role"] for m in send_and_wait(page, "Say more.").post_data_json["messages"]] == [
        "user", "assistant", "user"]
    assert page.locator("article").count() == 4
    first_server_id = page.get_attribute("#conversations .open[aria-current]", "data-server-id")
    assert first_server_id
    page.click("article.user >> nth=0 >> .actions >> text=Edit")  # the first message: the later turns go
    page.fill("article.user textarea", "Say goodbye.")
    with page.expect_request(CHAT_URL) as edited:
        page.click("article.user .actions >> text=Save & send")
    wait_until_idle(page)
    assert edited.value.post_data_json["messages"] == [{"role": "user", "content": "Say goodbye."}]
    assert page.locator("article").count() == 2
    assert [m["role"] for m in stored_messages(page)] == ["user", "assistant"]
    assert stored_messages(page)[0]["content"] == "Say goodbye."
    assert page.get_attribute("#conversations .open[aria-current]", "data-server-id") != first_server_id  # new one
    page.click("#new-chat")
    assert page.locator("article").count() == 0
    assert page.locator("#conversations li").count() == 2
    page.locator("#conversations .open").nth(1).click()
    assert page.text_content("article.user .body").strip() == "Say goodbye."
    watch.check()


# ---- safety ---------------------------------------------------------------------------------------------------------
def assert_inert(page: Page, selector: str) -> None:
    found = page.evaluate("""(selector) => {
        const roots = [...document.querySelectorAll(selector)];
        const all = roots.flatMap((r) => [r, ...r.querySelectorAll('*')]);
        return {
            scripts: all.filter((e) => e.tagName === 'SCRIPT').length,
            images: all.filter((e) => e.tagName === 'IMG').length,
            handlers: all.flatMap((e) => [...e.attributes].map((a) => a.name)).filter((n) => n.startsWith('on')),
            jsLinks: all.filter((e) => (e.getAttribute('href') || '').trim().toLowerCase().startsWith('javascript:'))
                .length,
            pwned: window.__pwned ?? null,
        };
    }""", selector)
    assert found == {"scripts": 0, "images": 0, "handlers": [], "jsLinks": 0, "pwned": None}


def fake_stream(text: str) -> str:
    """An SSE body as the server sends it: role delta, the text in three deltas, finish, [DONE]."""
    pieces = [text[: len(text) // 3], text[len(text) // 3: 2 * len(text) // 3], text[2 * len(text) // 3:]]
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_hostile_markdown_and_html_are_rendered_inert(chat):
    page, watch = chat
    set_settings(page, max_tokens="4")
    send_and_wait(page, HOSTILE)  # the user's own message, through the real server
    assert_inert(page, "article.user .body")
    assert "<script>" in page.text_content("article.user .body")  # shown as text, not run
    # the model's reply: the same markup, streamed in pieces (the route answers for the server)
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                     body=fake_stream(HOSTILE + "\n\n```js\nalert(6)\n```\n")))
    send_and_wait(page, "again")
    assert_inert(page, "article.assistant .body")
    links = page.locator("article .body a", has_text="click me")
    assert links.count() == 2 and all(link.get_attribute("href") is None for link in links.all())
    links.first.click()  # the javascript: href is gone: nothing runs, nothing navigates
    assert page.url.rstrip("/") == page.evaluate("() => location.origin")
    assert page.locator("article.assistant:last-of-type .code-block button.copy").count() == 1
    assert page.text_content("article.assistant:last-of-type pre code").strip() == "alert(6)"
    leak = page.locator('article.assistant .body a[href="http://attacker.example/leak.png"]')
    assert leak.count() == 1 and leak.text_content() == "tracker"  # the image is a link, never loaded
    watch.check()
    # the sanitizer alone, on raw HTML (the Markdown renderer shows raw HTML as text before it gets here)
    page.evaluate("""async (html) => { const { sanitize } = await import('/ui/markdown.js');
        const div = document.createElement('div'); div.id = 'sanitized'; div.append(sanitize(html));
        document.body.append(div); }""", '<img src=x onerror="window.__pwned=3"><script>alert(7)</script>'
                                         '<a href=" javascript:alert(8)">x</a><p onclick="alert(9)">p</p>')
    assert_inert(page, "#sanitized")
    assert page.inner_html("#sanitized").startswith('<a target="_blank"')
    # parsing the dirty HTML trips the page's CSP on the handlers (which never run): that report is the only error
    watch.check(allowed=lambda text: text.startswith("Executing inline event handler violates"))


def test_api_key_is_asked_for_and_sent_as_a_header(browser, keyed_server):
    page, watch = open_page(browser, keyed_server.url)
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.check("#remember-key")
    page.fill("#api-key", "wrong-key")
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.getElementById('key-error').textContent.includes('refused')")
    assert dialog.is_visible()
    assert stored_key(page) == (None, None)  # a refused key is not kept, "Remember" or not
    page.uncheck("#remember-key")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    dialog.wait_for(state="hidden")
    assert page.text_content("#model-name") == "SmolLM2-135M-Instruct"
    set_settings(page, max_tokens="4")
    request = send_and_wait(page, "Hi")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in request.url
    assert stored_messages(page)[1]["stats"]["completionTokens"] == 4
    assert stored_key(page) == (API_KEY, None)  # kept for this tab only: "Remember" was not ticked
    page.wait_for_function("() => /blocks in use$/.test(document.getElementById('kv-blocks').textContent)")
    # the 401s before the key (GET /v1/models, once per try) are the only console errors
    watch.check(allowed=lambda text: "status of 401" in text)
    # a new tab asks again; ticked, the key is kept across visits, and the next tab does not ask
    second = page.context.new_page()
    second.goto(keyed_server.url)
    second.locator("#key-dialog").wait_for(state="visible")
    second.check("#remember-key")
    second.fill("#api-key", API_KEY)
    second.press("#api-key", "Enter")
    second.locator("#key-dialog").wait_for(state="hidden")
    assert stored_key(second) == (API_KEY, API_KEY)
    third = page.context.new_page()
    third.goto(keyed_server.url)
    third.wait_for_function("() => document.getElementById('model-name').textContent === 'SmolLM2-135M-Instruct'")
    assert third.locator("#key-dialog").is_hidden()
    page.context.close()


def stored_key(page: Page) -> tuple[str | None, str | None]:
    """The API key the page keeps: (sessionStorage, localStorage)."""
    return (page.evaluate("sessionStorage.getItem('freehold.apiKey')"),
            page.evaluate("localStorage.getItem('freehold.apiKey')"))
