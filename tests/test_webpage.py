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
    running = RunningServer(Engine(model, tok, num_slots=2), model_name="page-llama3",
                            generation_defaults={"temperature": 0.3, "top_p": 0.8})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small_server(llama3_tokenizer):
    """The same talking model behind a 64-token context: two turns no longer fit."""
    tok = llama3_tokenizer
    header = ChatFormat(tok).encode_header({"role": "assistant", "content": ""})[-3:]
    script = header + tok.encode(ANSWER) + tok.encode(" la") * 4
    model = scripted_model(tok.n_words, [script], context_len=3, max_seq_len=4096)
    running = RunningServer(Engine(model, tok, num_slots=2, max_seq_len=64), model_name="small-llama3")
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


def chat_requests(page) -> list[dict]:
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def send_and_wait(page, text: str, num_replies: int) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.message.assistant[data-done]').length === {num_replies} "
                           "&& document.body.dataset.busy === ''", timeout=120_000)  # a busy machine decodes slowly


def test_defaults_come_from_the_model_card(server, page):
    """Temperature and top-p start at the model's generation_config; max tokens at 'the room left'."""
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'page-llama3'")
    assert page.input_value("#temperature") == "0.3" and page.input_value("#top-p") == "0.8"
    assert page.input_value("#max-tokens") == "" and page.get_attribute("#max-tokens", "max") == "4096"


def test_markdown_is_rendered_as_elements_never_as_html(server, page):
    page.goto(server.url + "/")
    markdown = "\n".join([
        "## Plan", "", "Some **bold**, *italic* and `code` with [a link](https://example.org/x).",
        "[bad](javascript:alert(1)) <script>pwn()</script> <img src=x onerror=pwn()>", "",
        "- one", "- two", "  - two a", "  - two b", "- three", "", "1. first", "2. second", "",
        "| name | novel |", "|---|:---:|", "| Emma | *Emma* |", "| Anne | Persuasion |", "",
        "> a quote", "", "```python", "print('<b>hi</b>')", "```", "", "---", "after"])
    shape = page.evaluate("""(text) => {
        const div = document.createElement('div');
        window.llama3RenderMarkdown(div, text);
        const q = (s) => Array.from(div.querySelectorAll(s));
        return {h2: q('h2').map(e => e.textContent), items: q('ul > li').length, nested: q('li ul li').length,
                ol: q('ol > li').map(e => e.textContent), cells: q('td').map(e => e.textContent),
                th: q('th').map(e => e.textContent), links: q('a').map(e => [e.textContent, e.getAttribute('href'),
                e.rel]), quote: q('blockquote').map(e => e.textContent), code: q('pre code').map(e => e.textContent),
                copy: q('.code button.copy').length, hr: q('hr').length, strong: q('strong').length,
                em: q('em').map(e => e.textContent), script: q('script').length, img: q('img').length,
                text: div.textContent};
    }""", markdown)
    assert shape["h2"] == ["Plan"] and shape["items"] == 5 and shape["nested"] == 2
    assert shape["ol"] == ["first", "second"] and shape["th"] == ["name", "novel"]
    assert shape["cells"] == ["Emma", "Emma", "Anne", "Persuasion"] and shape["quote"] == ["a quote"]
    assert shape["links"] == [["a link", "https://example.org/x", "noopener noreferrer nofollow"]]
    assert shape["code"] == ["print('<b>hi</b>')"] and shape["copy"] == 1 and shape["hr"] == 1
    assert shape["strong"] == 1 and "italic" in shape["em"] and "Emma" in shape["em"]
    assert shape["script"] == 0 and shape["img"] == 0  # tags from the model stay text
    assert "[bad](javascript:alert(1)) <script>pwn()</script>" in shape["text"]


def test_conversations_are_kept_with_regenerate_edit_and_counts(server, page):
    bodies = chat_requests(page)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'page-llama3'")
    page.click("summary")
    page.fill("#max-tokens", "12")
    send_and_wait(page, "Tell me of Emma", 1)
    stats = page.locator(".message.assistant .stats").first.inner_text()
    assert stats.startswith("12 tokens") and "tokens/s" in stats and "prompt" in stats
    assert bodies[-1]["stream_options"] == {"include_usage": True} and bodies[-1]["max_tokens"] == 12

    page.click(".message.assistant button.regenerate")  # the same question asked again, one reply shown
    page.wait_for_function("document.body.dataset.busy === '' && "
                           "document.querySelectorAll('.message.assistant[data-done]').length === 1 && "
                           "document.querySelectorAll('.message').length === 2")
    assert [m["content"] for m in bodies[-1]["messages"]] == ["Tell me of Emma"] and len(bodies) == 2

    page.click(".message button.edit")  # the last question comes back into the box, without its reply
    assert page.input_value("#input") == "Tell me of Emma" and page.locator(".message").count() == 0
    page.fill("#input", "")
    send_and_wait(page, "Tell me of Anne", 1)

    page.reload()  # a new page starts a new chat; the earlier one is in the list and comes back whole
    page.wait_for_function("document.getElementById('model-name').textContent === 'page-llama3'")
    assert page.locator(".message").count() == 0
    page.locator("#conversations li button.open", has_text="Tell me of Anne").first.click()
    assert page.locator(".message.user .body").first.inner_text() == "Tell me of Anne"
    assert page.locator(".message.assistant .body").first.inner_text().startswith("Hi <img")
    page.locator("#conversations li", has_text="Tell me of Anne").first.locator("button.delete").click()
    assert page.locator("#conversations li", has_text="Tell me of Anne").count() == 0


def test_a_long_conversation_drops_its_oldest_turns_with_a_note(small_server, page):
    """Replies take the room left; when the next turn does not fit, the oldest turns give way (shown, marked)
    instead of every message failing."""
    bodies = chat_requests(page)
    page.goto(small_server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'small-llama3'")
    send_and_wait(page, "Hello", 1)
    assert "max_tokens" not in bodies[-1]
    assert page.locator(".message.assistant .note").first.inner_text() == "(reached the token limit)"
    send_and_wait(page, "And again?", 2)
    send_and_wait(page, "Once more", 3)
    assert page.locator(".message.error").count() == 0
    assert [m["content"] for m in bodies[-1]["messages"] if m["role"] == "user"] == ["Once more"]
    assert "no longer fits the model's 64-token context" in page.locator(".message.assistant").nth(2).inner_text()
    assert page.locator(".message.outside-context").count() == 4  # shown, greyed, no longer sent


def test_server_down_is_a_clear_error_and_the_message_is_kept(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'page-llama3'")
    page.route("**/v1/chat/completions", lambda route: route.abort())
    page.fill("#input", "Anyone there?")
    page.press("#input", "Enter")
    error = page.wait_for_selector(".message.error")
    assert "cannot reach the llama3 server" in error.inner_text() and "llama3 serve" in error.inner_text()
    assert page.is_visible("#banner") and page.input_value("#input") == "Anyone there?"
    assert page.locator(".message.user").count() == 0
    page.unroute("**/v1/chat/completions")
