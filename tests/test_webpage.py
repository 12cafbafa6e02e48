"""The web chat page at `/`, in headless Chromium (Debian's /usr/bin/chromium driven by playwright): type a
message, watch the reply stream in, stop it, go on with the conversation; model output is never HTML."""

from __future__ import annotations

import json

import pytest

from llama3.inference.engine import Engine
from llama3.tokenizer import ChatFormat
from tests.serve_server import RunningServer, scripted_model

pytestmark = pytest.mark.timeout(180)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# What the model says: HTML that must stay text, markdown that may be rendered, then " la" forever.
ANSWER = "Hi <img src=x onerror=pwn()> **bold** and `code`"


@pytest.fixture(scope="module")
def server(llama3_tokenizer):
    tok = llama3_tokenizer
    header = ChatFormat(tok).encode_header({"role": "assistant", "content": ""})[-3:]
    la = tok.encode(" la")
    script = header + tok.encode(ANSWER) + la * 4  # (… la la la) -> la: an endless stream
    model = scripted_model(tok.n_words, [script], context_len=3, max_seq_len=4096)
    running = RunningServer(Engine(model, tok, num_slots=2), model_name="page-llama3")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(bypass_csp=True)  # the page forbids eval, which wait_for_function uses
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def reply_text(page, index: int) -> str:
    return page.locator(".message.assistant .body").nth(index).inner_text()


def test_type_stream_stop_and_continue(server, page):
    sent_bodies = []
    page.on("request", lambda r: sent_bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'page-llama3'")
    page.click("summary")
    page.fill("#system", "You are a test.")
    page.fill("#max-tokens", "")  # no limit: the reply streams until stopped
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")

    page.fill("#input", "Hello!")
    page.press("#input", "Enter")
    # The reply streams in: its text grows while the stop button shows.
    page.wait_for_function("document.querySelector('.message.assistant .body')?.textContent.includes('la la la')")
    assert page.is_visible("#stop") and page.is_disabled("#send")
    first_look = reply_text(page, 0)
    page.wait_for_function(f"document.querySelector('.message.assistant .body').textContent.length > {len(first_look) + 12}")

    # Model output is text, never markup: no <img> element, the tag shows literally; markdown is rendered.
    assert page.locator("#log img").count() == 0
    assert "<img src=x onerror=pwn()>" in reply_text(page, 0)
    assert page.locator(".message.assistant strong").first.inner_text() == "bold"
    assert page.locator(".message.assistant code").first.inner_text() == "code"

    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-stopped='1']")
    stopped_at = reply_text(page, 0)
    page.wait_for_timeout(500)
    assert reply_text(page, 0) == stopped_at  # nothing more arrives
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    assert server.wait_for_metric("llama3_active_slots", 0) == 0  # the server freed the slot
    assert server.metric('llama3_requests_finished_total{reason="cancelled"}') >= 1

    # Second turn: the history (with the stopped reply), the system prompt and temperature go along.
    page.fill("#input", "And again?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 2 && "
                           "document.querySelectorAll('.message.assistant .body')[1].textContent.includes('Hi <img')")
    page.click("#stop")
    page.wait_for_selector(".message.assistant:nth-of-type(4)[data-stopped='1']")
    first, second = sent_bodies[0], sent_bodies[1]
    assert first["stream"] is True and first["temperature"] == 0 and "max_tokens" not in first
    assert first["messages"] == [{"role": "system", "content": "You are a test."},
                                 {"role": "user", "content": "Hello!"}]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"].startswith(ANSWER) and second["messages"][3]["content"] == "And again?"
    assert server.wait_for_metric("llama3_active_slots", 0) == 0


def test_new_chat_clears_the_conversation(server, page):
    page.goto(server.url + "/")
    page.fill("#input", "One")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.message.assistant .body')?.textContent.includes('Hi')")
    page.click("#new-chat")
    page.wait_for_function("document.querySelectorAll('.message').length === 0")
    assert server.wait_for_metric("llama3_active_slots", 0) == 0


def test_server_errors_are_shown_and_the_turn_is_dropped(server, page):
    page.goto(server.url + "/")
    page.click("summary")
    page.fill("#max-tokens", "100000")  # over the 4096-token context: the server answers 400
    page.fill("#input", "Too long")
    page.press("#input", "Enter")
    error = page.wait_for_selector(".message.error")
    assert "maximum context length is 4096 tokens" in error.inner_text()
    assert page.locator(".message.assistant").count() == 0
    assert page.is_enabled("#send") and page.is_hidden("#stop")
