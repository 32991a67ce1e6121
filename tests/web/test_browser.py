"""`hyprstream web` in a real browser (headless Chromium): the page with its token, the Models
screen, F2, a message to the demo model, its reply; then the tab closes and no app process nor
engine child is left. A failure leaves `failure.png` in the test's tmp dir."""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import closing

import pytest

from tests.web.browser import Page, find_chromium, screenshot_on_failure, start_browser
from tests.web.live import describe, engine_children, wait_gone


@pytest.fixture
def chrome():
    found = find_chromium()
    if found is None:
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    pytest.importorskip("selenium")
    browser = start_browser(*found)
    yield browser
    browser.quit()


def saved_replies(home) -> list[str]:
    """The assistant messages the app saved (each written when its reply is complete), oldest first."""
    path = home / "conversations.sqlite3"
    if not path.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return [row[0] for row in db.execute("SELECT content FROM messages WHERE role = 'assistant' ORDER BY id")]
    except sqlite3.OperationalError:  # the app is creating it (no table yet) or writing: ask again
        return []


def wait_for_reply(home, timeout: float = 180, *, after: int = 0) -> str:
    """The reply saved after the first `after` ones."""
    deadline = time.monotonic() + timeout
    while len(replies := saved_replies(home)) <= after:
        assert time.monotonic() < deadline, "no reply was saved"
        time.sleep(0.3)
    return replies[after]


def test_chat_with_the_demo_model_in_a_browser_then_close_the_tab(web, demo_home, chrome, tmp_path):
    from selenium.webdriver.common.keys import Keys

    server = web()
    page = Page(chrome)
    with screenshot_on_failure(chrome, tmp_path / "failure.png"):
        chrome.get(server.page())
        assert chrome.current_url == f"{server.url}/"  # the token went into a cookie, out of the address bar
        page.wait_for("hyprstream — Models", timeout=90)
        page.wait_for("tiny-demo", timeout=60)

        at = len(page.text)
        page.type(Keys.F2)
        page.wait_for("hyprstream — Chat", timeout=60, after=at)
        page.wait_for("Message (enter sends", timeout=60, after=at)

        at = len(page.text)
        page.type("Hello from a browser", Keys.ENTER)
        page.wait_for("Hello from a browser", timeout=30, after=at)
        reply = wait_for_reply(demo_home)
        words = re.findall(r"[A-Za-z]{3,}", reply)
        deadline = time.monotonic() + 30
        while not any(w in page.text[at:] for w in words) and time.monotonic() < deadline:
            time.sleep(0.2)
        if words:
            assert any(w in page.text[at:] for w in words), f"the reply {reply!r} was not drawn"
        else:  # a reply with no word in it: its label at least
            page.wait_for("tiny-demo (base)", timeout=10, after=at)
        chrome.save_screenshot(str(tmp_path / "reply.png"))

        # Close the tab (another stays open, so the browser runs on): its app and engine child end.
        tree = server.descendants()
        assert engine_children(tree), describe(tree)
        app_tab = chrome.current_window_handle
        chrome.switch_to.new_window("tab")
        other = chrome.current_window_handle
        chrome.switch_to.window(app_tab)
        chrome.close()
        chrome.switch_to.window(other)
        left = wait_gone(tree, timeout=40)
        assert not left, f"orphans after closing the tab: {describe(left)}"
        assert server.descendants() == [] and server.proc.poll() is None
