"""The README's picture of `hyprstream web`, taken with the browser of the tests:

    python -m tests.web.screenshot assets/web.png            # the real model (SmolLM2-135M), a question
    python -m tests.web.screenshot assets/web.png --demo     # the tiny demo model

A fresh home in a temp folder, `hyprstream web` on it, headless Chromium on the page, F2, one
question, the reply, a screenshot.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.web.browser import Page, find_chromium, start_browser
from tests.web.live import describe, start_web, wait_gone
from tests.web.test_browser import wait_for_reply


def fill_home(home: Path, *, demo: bool) -> None:
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    if demo:
        from hyprstream_tui.engine.tiny import DEMO_NAME, build_demo_model

        store.import_model(build_demo_model(home.parent / "demo-src"), name=DEMO_NAME)
    else:
        from hyprstream_tui.engine.gguf import import_gguf
        from tests.realmodel import MODEL_NAME, gguf_path

        import_gguf(store, gguf_path(), name=MODEL_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.web.screenshot")
    parser.add_argument("output", type=Path)
    parser.add_argument("--demo", action="store_true", help="the tiny demo model instead of SmolLM2-135M")
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--expect", default="capital of France is Paris",
                        help="ask again in a new chat (ctrl+n) until the reply has it")
    args = parser.parse_args(argv)
    found = find_chromium()
    if found is None:
        print("error: needs chromium and chromedriver (apt-get install chromium chromium-driver)", file=sys.stderr)
        return 1
    from selenium.webdriver.common.keys import Keys

    with tempfile.TemporaryDirectory(prefix="hyprstream-web-shot-") as tmp:
        home = Path(tmp) / "home"
        fill_home(home, demo=args.demo)
        server = start_web(home, Path(tmp))
        chrome = start_browser(*found, width=1280, height=720)
        try:
            page = Page(chrome)
            chrome.get(server.page())
            page.wait_for("hyprstream — Models", timeout=90)
            page.type(Keys.F2)
            page.wait_for("Message (enter sends", timeout=60)
            for attempt in range(10):  # sampling at temperature 0.7: a reply with `--expect` in it
                time.sleep(1.0)
                page.type(args.question, Keys.ENTER)
                if args.expect in wait_for_reply(home, timeout=300, after=attempt):
                    break
                page.type(Keys.CONTROL, "n")
            time.sleep(2.0)  # the finished reply is redrawn as Markdown
            chrome.save_screenshot(str(args.output))
            tree = server.descendants()
        finally:
            chrome.quit()
        server.stop()
        if left := wait_gone(tree, timeout=40):
            print(f"warning: left behind: {describe(left)}", file=sys.stderr)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
