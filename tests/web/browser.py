"""Headless Chromium through Selenium (Debian's `chromium` and `chromium-driver`; nothing is
downloaded), with what the page's websocket receives kept as text, so a test can read the screen.

xterm.js draws on a canvas, so the terminal's text is not in the DOM; a script that runs before
the page's own wraps `WebSocket` and appends every binary frame (the app's terminal output) to
`window.__hyprstreamStream`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from tests.web.live import screen_text

CAPTURE = r"""
(() => {
  const Native = window.WebSocket;
  const decoder = new TextDecoder();
  window.__hyprstreamStream = "";
  window.WebSocket = function (url, protocols) {
    const socket = protocols === undefined ? new Native(url) : new Native(url, protocols);
    socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") {
        window.__hyprstreamStream += decoder.decode(event.data, {stream: true});
      }
    });
    return socket;
  };
  window.WebSocket.prototype = Native.prototype;
})();
"""


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths: $HYPRSTREAM_CHROMIUM / $HYPRSTREAM_CHROMEDRIVER, else on PATH."""
    browser = os.environ.get("HYPRSTREAM_CHROMIUM") or next(
        (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
    driver = os.environ.get("HYPRSTREAM_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_browser(browser: str, driver: str, *, width: int = 1280, height: int = 800):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    # the page's size exactly (the window's includes what headless Chromium keeps for its UI)
    chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    chrome.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CAPTURE})
    return chrome


class Page:
    """The app page in one tab: the screen as text, keys typed into the terminal."""

    def __init__(self, chrome) -> None:
        self.chrome = chrome

    @property
    def text(self) -> str:
        return screen_text(self.chrome.execute_script("return window.__hyprstreamStream || ''"))

    def wait_for(self, needle: str, timeout: float = 60, *, after: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (at := self.text.find(needle, after)) >= 0:
                return at
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} was not drawn within {timeout} s; the screen drew:\n{self.text[-3000:]}")

    def type(self, *keys: str) -> None:
        from selenium.webdriver.common.by import By

        self.chrome.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys(*keys)


@contextlib.contextmanager
def screenshot_on_failure(chrome, path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            chrome.save_screenshot(str(path))
            exc.add_note(f"screenshot of the page: {path}")
        raise
