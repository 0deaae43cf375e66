"""End-to-end tests of the web client in a real headless Chromium, against the real service.

Playwright drives Debian's `chromium` (never a downloaded browser); the service runs as a
uvicorn process whose model is the fake OpenAI server, so each test scripts the replies.
Every test fails on a console error or an uncaught exception in the page, except the few
errors a test provokes on purpose (a refused request) and names.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Error,
    Locator,
    Page,
    Request,
    ViewportSize,
    expect,
    sync_playwright,
)

from tests.fake_openai import FakeOpenAI, Reply, ToolCall, text
from tests.support import Service

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Root in a sandbox whose only network is loopback: no sandbox, no GPU, and none of
# Chromium's background calls to Google's hosts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 780}
TIMEOUT_MS = 15_000  # the bound on every wait for the page
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"

LONG_TEXT = " ".join(f"word{i}" for i in range(1, 61)) + "."

ServiceFactory = Callable[..., Service]  # conftest's `start_service`


def normalize(s: str) -> str:
    """Text as a reader sees it: runs of whitespace as one space."""
    return " ".join(s.split())


@dataclass
class ReplyView:
    """An assistant message on the page."""

    article: Locator

    def content(self) -> str:
        return normalize(self.article.locator(".content").inner_text())

    def wait_status(self, status: str) -> None:
        expect(self.article).to_have_attribute("data-status", status)


@dataclass
class ChatPage:
    """The page under test and what it reported: errors and every request it made."""

    page: Page
    base_url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    # Console errors the test provokes on purpose (Chromium logs refused requests).
    expected_errors: list[re.Pattern[str]] = field(default_factory=list)

    def open(self, fragment: str = "") -> None:
        self.page.goto(f"{self.base_url}/{fragment}")
        expect(self.page.locator("#composer-input")).to_be_visible()

    def send(self, content: str) -> None:
        """Types a message in the composer and sends it with Enter."""
        box = self.page.locator("#composer-input")
        box.fill(content)
        box.press("Enter")

    def reply(self, index: int = -1) -> ReplyView:
        """The `index`-th assistant message; the last one by default."""
        return ReplyView(self.page.locator(".message.assistant").nth(index))

    def chat_id(self) -> str:
        """The open chat's ID, from the URL."""
        match = re.search(r"#(chat_[\w-]+)$", self.page.url)
        assert match, f"no chat in the URL {self.page.url!r}"
        return match.group(1)

    def chat_link(self, chat_id: str) -> Locator:
        return self.page.locator(f'.chat-link[data-chat-id="{chat_id}"]')

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.expected_errors)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, once for the module."""
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is missing: apt-get install chromium (or set CHROMIUM)"
        # On a developer's machine that is a skip; in CI a browser test must not pass unrun.
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextmanager
def watched_page(browser: Browser, base_url: str) -> Iterator[ChatPage]:
    """A page in a fresh browser context; fails on errors that the test did not expect."""
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    chat = ChatPage(page, base_url)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            chat.errors.append(f"console: {message.text}")

    def on_page_error(error: Error) -> None:
        chat.errors.append(f"pageerror: {error}")

    def on_request(request: Request) -> None:
        chat.requests.append(request.url)

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    page.on("request", on_request)
    try:
        yield chat
    finally:
        context.close()
    assert chat.unexpected_errors() == [], "the page reported errors"


@pytest.fixture
def chat(browser: Browser, shared_service: Service, fake: FakeOpenAI) -> Iterator[ChatPage]:
    """The page of the shared service, with a reset fake behind it."""
    with watched_page(browser, shared_service.base_url) as page:
        yield page


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------- the reply, live


def test_reply_text_grows_live_then_completes(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(text(LONG_TEXT, pieces=30, delay=0.08))
    chat.open()
    box = chat.page.locator("#composer-input")
    box.fill("first line")
    box.press("Shift+Enter")  # a new line, not a send
    box.press_sequentially("second line")
    box.press("Enter")

    expect(chat.page.locator(".message.user .bubble")).to_have_text("first line\nsecond line")
    reply = chat.reply()
    # While the reply is written the composer cannot send, and Stop is offered.
    expect(chat.page.locator("#stop-button")).to_be_visible()
    expect(chat.page.locator("#send-button")).to_be_hidden()

    seen: list[str] = []
    deadline = time.monotonic() + 15
    while reply.article.get_attribute("data-status") == "in_progress":
        current = reply.content()
        if current and (not seen or seen[-1] != current):
            seen.append(current)
        assert time.monotonic() < deadline, "the reply never completed"
        time.sleep(0.03)

    assert len(seen) >= 4, f"the text appeared in {len(seen)} steps, not live: {seen}"
    assert all(LONG_TEXT.startswith(step) for step in seen), "a step was not a prefix"
    reply.wait_status("completed")
    assert reply.content() == LONG_TEXT
    expect(chat.page.locator("#send-button")).to_be_enabled()
    expect(chat.page.locator("#stop-button")).to_be_hidden()
    expect(chat.chat_link(chat.chat_id())).to_have_count(1)


def test_reload_mid_reply_continues_without_duplication(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(text(LONG_TEXT, pieces=40, delay=0.1))
    chat.open()
    chat.send("tell me a long story")
    reply = chat.reply()
    wait_until(lambda: len(reply.content()) > 20, "the first words")
    chat_id = chat.chat_id()

    chat.page.reload()
    assert chat.page.url.endswith(f"#{chat_id}"), "the chat's URL did not survive the reload"
    # Re-attached while the reply is still being written, then continued to the whole text,
    # each word once.
    reply.wait_status("in_progress")
    reply.wait_status("completed")
    assert reply.content() == LONG_TEXT
    expect(chat.page.locator(".message.user")).to_have_count(1)
    expect(chat.page.locator(".message.assistant")).to_have_count(1)


def test_stop_cancels_the_reply_and_keeps_its_text(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(text(LONG_TEXT, pieces=60, delay=0.1))
    chat.open()
    chat.send("talk for a while")
    reply = chat.reply()
    wait_until(lambda: len(reply.content()) > 10, "the first words")

    chat.page.get_by_role("button", name="Stop").click()
    reply.wait_status("cancelled")
    expect(reply.article.locator(".badge")).to_have_text("Stopped")
    kept = reply.content()
    assert kept and LONG_TEXT.startswith(kept) and kept != LONG_TEXT
    expect(chat.page.locator("#send-button")).to_be_enabled()
    expect(chat.page.locator("#stop-button")).to_be_hidden()

    chat.page.reload()  # the stored reply says the same
    reply.wait_status("cancelled")
    assert reply.content() == kept


def test_tool_call_shows_as_an_expandable_block(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(
        Reply(tool_calls=[ToolCall("calculate", '{"expression": "17 * 23"}')]),
        text("17 × 23 is **391**.", pieces=3),
    )
    chat.open()
    chat.send("What is 17 times 23?")
    reply = chat.reply()
    reply.wait_status("completed")

    block = reply.article.locator("details.tool-call")
    expect(block).to_have_count(1)
    expect(block).to_have_attribute("data-state", "done")
    summary = block.locator("summary")
    expect(summary).to_contain_text("calculate")
    expect(summary).to_contain_text("391")
    expect(block.locator(".tool-body")).to_be_hidden()  # compact until opened
    summary.focus()
    summary.press("Enter")  # opens from the keyboard
    expect(block.locator(".tool-body")).to_contain_text('"expression": "17 * 23"')
    expect(block.locator(".tool-body")).to_contain_text("391")
    expect(reply.article.locator(".content strong")).to_have_text("391")

    chat.page.reload()  # the same block, from the stored message's tool_calls
    expect(chat.reply().article.locator("details.tool-call summary")).to_contain_text("391")


# --------------------------------------------------------------------- chats


def test_delete_chat_asks_first(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(text("Sure.", pieces=1))
    chat.open()
    chat.send("a chat to delete")
    chat.reply().wait_status("completed")
    chat_id = chat.chat_id()
    link = chat.chat_link(chat_id)
    expect(link).to_have_count(1)

    chat.page.get_by_role("button", name="Delete").click()
    dialog = chat.page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(link).to_have_count(1)

    chat.page.get_by_role("button", name="Delete").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(link).to_have_count(0)
    expect(chat.page.locator(".message")).to_have_count(0)
    expect(chat.page.locator("#chat-title")).to_have_text("New chat")
    assert "#" not in chat.page.url
    assert chat.page.request.get(f"{chat.base_url}/chats/{chat_id}").status == 404


def test_rename_chat_from_the_header(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(text("Hi.", pieces=1))
    chat.open()
    chat.send("hello")
    chat.reply().wait_status("completed")
    chat_id = chat.chat_id()

    chat.page.get_by_role("button", name="Rename").click()
    title_box = chat.page.get_by_label("Chat title")
    expect(title_box).to_be_focused()
    title_box.fill("Greetings")
    title_box.press("Enter")
    expect(chat.page.locator("#chat-title")).to_have_text("Greetings")
    expect(chat.chat_link(chat_id)).to_have_text("Greetings")

    chat.page.reload()
    expect(chat.page.locator("#chat-title")).to_have_text("Greetings")


def test_chat_list_is_newest_first_and_loads_more_pages(
    browser: Browser, start_service: ServiceFactory
) -> None:
    service = start_service()  # its own database: exactly the chats made here
    with service.client() as http:
        for n in range(1, 24):
            assert http.post("/chats", json={"title": f"chat {n}"}).status_code == 201
    with watched_page(browser, service.base_url) as chat:
        chat.open()
        links = chat.page.locator(".chat-link")
        expect(links).to_have_count(20)  # the API's default page
        expect(links.first).to_have_text("chat 23")
        more = chat.page.get_by_role("button", name="Load more")
        more.click()
        expect(links).to_have_count(23)
        expect(links.last).to_have_text("chat 1")
        expect(more).to_be_hidden()
        links.last.click()  # a link opens its chat, and the URL names it
        expect(chat.page.locator("#chat-title")).to_have_text("chat 1")
        assert chat.chat_id()


def test_phone_width_puts_the_chat_list_in_a_drawer(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(text("Small screens work too.", pieces=2))
    chat.page.set_viewport_size(PHONE)
    chat.open()
    chat.send("hi from a phone")
    chat.reply().wait_status("completed")
    chat_id = chat.chat_id()

    sidebar = chat.page.locator("#sidebar")
    toggle = chat.page.get_by_role("button", name="Show chats")
    expect(sidebar).to_be_hidden()
    toggle.click()
    expect(sidebar).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    chat.page.get_by_role("button", name="New chat").click()
    expect(sidebar).to_be_hidden()
    expect(chat.page.locator("#chat-title")).to_have_text("New chat")

    toggle.click()
    chat.chat_link(chat_id).click()
    expect(sidebar).to_be_hidden()
    expect(chat.page.locator(".message.user .bubble")).to_have_text("hi from a phone")
    overflow = chat.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the phone"


# --------------------------------------------------------------------- errors in place


@pytest.mark.parametrize(
    ("reply", "status", "badge"),
    [
        pytest.param(Reply(status=500), "failed", "The reply failed", id="provider-error"),
        pytest.param(
            Reply(chunks=["Cut ", "short"], finish_reason="length"),
            "incomplete",
            "Incomplete",
            id="length-limit",
        ),
    ],
)
def test_a_reply_that_did_not_complete_says_why(
    chat: ChatPage, fake: FakeOpenAI, reply: Reply, status: str, badge: str
) -> None:
    fake.push(reply)
    chat.open()
    chat.send("try this")
    view = chat.reply()
    view.wait_status(status)
    expect(view.article.locator(".badge")).to_contain_text(badge)
    expect(view.article.locator(".status-detail")).not_to_be_empty()
    expect(chat.page.locator("#send-button")).to_be_enabled()  # the chat is free again
    text_before = view.content()
    chat.page.reload()  # the stored message says the same
    view.wait_status(status)
    expect(view.article.locator(".badge")).to_contain_text(badge)
    assert view.content() == text_before


def test_busy_chat_offers_to_show_the_reply_in_progress(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(text("Done.", pieces=1))
    chat.open()
    chat.send("start")
    chat.reply().wait_status("completed")
    chat_id = chat.chat_id()
    # Another client starts a slow reply that this page does not know about.
    fake.push(text(LONG_TEXT, pieces=30, delay=0.1))
    other = chat.page.request.post(
        f"{chat.base_url}/chats/{chat_id}/messages",
        data={"content": "from another tab"},
        headers={"Accept": "application/json"},
    )
    assert other.status == 202

    chat.expected_errors.append(re.compile(r"status of 409"))
    chat.send("me too")
    notice = chat.page.get_by_role("alert")
    expect(notice).to_contain_text("still writing a reply")
    notice.get_by_role("button", name="Show that reply").click()
    expect(chat.page.locator(".message.user .bubble").last).to_have_text("from another tab")
    chat.reply().wait_status("completed")
    assert chat.reply().content() == LONG_TEXT
    expect(chat.page.locator("#composer-input")).to_have_value("me too")  # not lost


def test_network_gone_then_retry_sends_once(chat: ChatPage, fake: FakeOpenAI) -> None:
    fake.push(text("Back online.", pieces=2))
    chat.open()
    chat.expected_errors.append(re.compile(r"net::ERR_INTERNET_DISCONNECTED"))
    chat.page.context.set_offline(True)
    chat.send("are you there?")
    notice = chat.page.get_by_role("alert")
    expect(notice).to_contain_text("unreachable")
    expect(chat.page.locator(".message")).to_have_count(0)

    chat.page.context.set_offline(False)
    notice.get_by_role("button", name="Retry").click()
    chat.reply().wait_status("completed")
    assert chat.reply().content() == "Back online."
    messages = chat.page.request.get(f"{chat.base_url}/chats/{chat.chat_id()}/messages").json()
    assert [m["content"] for m in messages["data"] if m["role"] == "user"] == ["are you there?"]


# --------------------------------------------------------------------- safety


LOADS_X = re.compile(r"/x(\?|$)")  # what the hostile snippets below try to load
HOSTILE = [
    pytest.param('<img src=x onerror="window.__xss=1">', "img", id="img-onerror"),
    pytest.param("<script>window.__xss=2</script>", "script", id="script-block"),
    pytest.param('<svg onload="window.__xss=3"></svg>', "svg", id="svg-onload"),
    pytest.param('<iframe src="/x?iframe"></iframe>', "iframe", id="iframe"),
    pytest.param("[click](javascript:window.__xss=4)", "a[href]", id="javascript-link"),
    pytest.param("![pixel](/x?markdown-image)", "img", id="markdown-image"),
    pytest.param('<a href="/x" onclick="window.__xss=5">a</a>', "a[onclick]", id="html-anchor"),
    pytest.param("<style>body{display:none}</style>", "style", id="style-block"),
    pytest.param('<p style="color:red">styled</p>', "[style]", id="style-attribute"),
    pytest.param("[x](data:text/html;base64,PHNjcmlwdD4xPC9zY3JpcHQ+)", "a[href]", id="data-link"),
]


@pytest.mark.parametrize(("markdown", "forbidden"), HOSTILE)
def test_markdown_renderer_drops_what_could_run_or_load(
    chat: ChatPage, markdown: str, forbidden: str
) -> None:
    chat.open()
    rendered = chat.page.evaluate(
        """async (markdown) => {
            const { renderMarkdown } = await import("/static/markdown.js");
            const box = document.createElement("div");
            box.id = "probe";
            box.append(renderMarkdown(markdown));
            document.body.append(box);
            await new Promise((resolve) => setTimeout(resolve, 200));
            return box.innerHTML;
        }""",
        markdown,
    )
    assert chat.page.locator(f"#probe {forbidden}").count() == 0, rendered
    assert chat.page.evaluate("window.__xss") is None
    assert not [url for url in chat.requests if LOADS_X.search(url)]


def test_reply_html_is_shown_as_text_and_runs_nothing(chat: ChatPage, fake: FakeOpenAI) -> None:
    hostile = (
        'Look: <img src=x onerror="window.__xss=1"> here.\n\n'
        "<script>window.__xss=2</script>\n\n"
        "![pixel](/x?markdown-image) and [a link](javascript:window.__xss=3)\n\n"
        "**bold** stays Markdown."
    )
    fake.push(text(hostile, pieces=6))
    chat.open()
    chat.send("show me some HTML")
    reply = chat.reply()
    reply.wait_status("completed")

    content = reply.article.locator(".content")
    expect(content).to_contain_text('<img src=x onerror="window.__xss=1">')
    expect(content).to_contain_text("<script>window.__xss=2</script>")
    expect(content.locator("strong")).to_have_text("bold")
    for tag in ("img", "script"):
        expect(content.locator(tag)).to_have_count(0)
    content.get_by_text("a link").click()  # a javascript: link that lost its href
    chat.page.wait_for_timeout(300)

    assert chat.page.evaluate("window.__xss") is None
    loaded = [url for url in chat.requests if LOADS_X.search(url)]
    assert loaded == [], f"the reply made the browser load {loaded}"


def test_page_is_served_with_a_strict_content_security_policy(chat: ChatPage) -> None:
    response = chat.page.request.get(f"{chat.base_url}/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


# --------------------------------------------------------------------- the README's picture


def test_screenshot_of_a_chat(
    browser: Browser, start_service: ServiceFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A chat with a tool call and Markdown, in a service of its own so that the sidebar
    holds only the chats made here. Also checks that `chat.updated` renames the chat in the
    sidebar live. Writes docs/screenshot.png when UPDATE_SCREENSHOT=1."""
    service = start_service()
    with service.client() as http:
        for title in ("Regex for ISO 8601 dates", "Three days in Lisbon", "SSE or WebSockets?"):
            assert http.post("/chats", json={"title": title}).status_code == 201
    fake.push(
        Reply(tool_calls=[ToolCall("calculate", '{"expression": "1299 * 12 * 0.85"}')]),
        text(
            "A year of the Pro plan with the 15% discount comes to **13,249.80**:\n\n"
            "| plan | monthly | yearly, −15% |\n"
            "|---|---:|---:|\n"
            "| Basic | 499.00 | 5,089.80 |\n"
            "| Pro | 1,299.00 | 13,249.80 |\n",
            pieces=12,
        ),
        # The service names an untitled chat after its first reply, with one more call.
        text("Pro plan yearly price"),
    )
    with watched_page(browser, service.base_url) as chat:
        chat.page.set_viewport_size({"width": 1280, "height": 860})
        chat.open()
        chat.send("How much is a year of the Pro plan (1,299/month) with a 15% discount?")
        chat.reply().wait_status("completed")
        expect(chat.chat_link(chat.chat_id())).to_have_text("Pro plan yearly price")
        expect(chat.page.locator("#chat-title")).to_have_text("Pro plan yearly price")

        fake.push(
            text(
                "Use `Decimal`, never `float`, for money:\n\n"
                "```python\n"
                "from decimal import Decimal\n\n"
                'yearly = Decimal("1299") * 12 * Decimal("0.85")\n'
                "print(yearly)  # 13249.80\n"
                "```\n\n"
                "- `float` can't represent most decimal fractions exactly\n"
                "- `Decimal` keeps the cents you wrote",
                pieces=12,
            )
        )
        chat.send("How should I do that in Python?")
        expect(chat.page.locator(".message.assistant")).to_have_count(2)
        chat.reply().wait_status("completed")
        chat.page.locator("#composer-input").blur()
        chat.page.wait_for_timeout(300)  # the last frame's render and scroll

        target = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "s.png"
        chat.page.screenshot(path=str(target))
        assert target.stat().st_size > 10_000
