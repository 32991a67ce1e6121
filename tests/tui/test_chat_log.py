"""The chat log while a reply streams: it stays at the end in the frame that draws new text, lets
go when the user scrolls up, and holds text back (to draw it later, none lost) while the user
types. A small app holds the real ChatLog with the app's styles; Pilot drives it."""

from __future__ import annotations

import time

import pytest
from textual.app import App, ComposeResult
from textual.widgets import Input

from hyprstream_tui.engine.events import TokenDelta
from hyprstream_tui.tui.app import HyprApp
from hyprstream_tui.tui.widgets.chat_log import ChatLog
from hyprstream_tui.tui.widgets.stream_tail import StreamTail

pytestmark = pytest.mark.asyncio

WORDS = [f"word{i} and more " for i in range(600)]


class LogApp(App):
    CSS_PATH = HyprApp.CSS_PATH

    def compose(self) -> ComposeResult:
        yield ChatLog(id="chat-log")
        yield Input(id="chat-input")


async def stream(pilot, log: ChatLog, words: list[str], *, show: bool = True) -> None:
    """Push `words` as token deltas of reply "r", drain them into the log and let it draw."""
    for word in words:
        log.events.push(TokenDelta(request_id="r", text=word, tokens=1))
    await log.drain(show=show)
    await pilot.pause()


async def test_a_streaming_reply_stays_in_view_until_the_user_scrolls_up():
    app = LogApp()
    async with app.run_test(size=(100, 30)) as pilot:
        log = app.query_one(ChatLog)
        log.add_user("Tell me a long story.")
        reply = log.add_replies(["model"], ["r"])[0]
        await pilot.pause()
        for start in range(0, 300, 30):
            await stream(pilot, log, WORDS[start : start + 30])
        assert log.max_scroll_y > 10  # the reply is taller than the view
        assert log.scroll_y == log.max_scroll_y  # and its end is in view

        log.scroll_to(y=0, animate=False)  # the user scrolls up to read
        await pilot.pause()
        for start in range(300, 450, 30):
            await stream(pilot, log, WORDS[start : start + 30])
        assert log.scroll_y == 0 and log.max_scroll_y > 10  # streaming does not pull them down

        log.scroll_end(animate=False)  # back at the end: it follows again
        await pilot.pause()
        await stream(pilot, log, WORDS[450:600])
        assert log.scroll_y == log.max_scroll_y
        await log.finish("r", text=None, meta=None)
        assert reply.text == "".join(WORDS)


async def test_text_held_back_while_typing_is_drawn_later_and_none_is_lost():
    app = LogApp()
    async with app.run_test(size=(100, 30)) as pilot:
        log = app.query_one(ChatLog)
        reply = log.add_replies(["model"], ["r"])[0]
        await pilot.pause()
        await stream(pilot, log, WORDS[:5])
        assert reply.updates == 1
        await stream(pilot, log, WORDS[5:10], show=False)
        await stream(pilot, log, WORDS[10:15], show=False)
        assert reply.updates == 1 and reply.text == "".join(WORDS[:15])  # kept, not drawn
        await log.drain()  # nothing new arrived, but held text is drawn now
        assert reply.updates == 2
        await stream(pilot, log, WORDS[15:20], show=False)
        await log.finish("r", text=None, meta=None)  # the reply's end draws what was held
        body = reply.query_one(".message-body")
        assert body.source == "".join(WORDS[:20])


async def test_the_app_knows_when_the_user_is_typing(home):
    from hyprstream_tui.tui.batch import TYPING_S

    app = HyprApp(home=home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        assert not app.typing()
        before = time.monotonic()
        await pilot.press("x")
        assert app.last_key >= before  # every key is noted
        app.last_key = time.monotonic()
        assert app.typing()
        app.last_key -= TYPING_S
        assert not app.typing()


async def test_full_collections_run_when_the_app_chooses_and_python_gets_its_own_back(home):
    import gc

    from hyprstream_tui.tui.priority import Collections

    before = gc.get_threshold()
    app = HyprApp(home=home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        assert gc.get_threshold() == (*before[:2], Collections.NEVER)  # Python's own are off
        assert not app.collections.due()
        app.collections._last -= Collections.EVERY_S  # ten seconds later, while the user types
        await pilot.press("x")
        await pilot.pause()
        assert app.collections.count == 1 and not app.collections.due()  # after the key's frame
        app.collections._last -= Collections.EVERY_S
        app.last_key -= 2  # and when the user is not typing, on the app's idle timer
        await pilot.pause(1.2)
        assert app.collections.count == 2
    assert gc.get_threshold() == before


class KeyOrderApp(HyprApp):
    """Records, in order, each key's handling by the chat input, each frame displayed, and each
    run of the work held back for after a key's frame."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.order: list[str] = []

    def post_display_hook(self) -> None:
        self.order.append("frame")
        super().post_display_hook()

    def _after_key(self) -> None:
        self.order.append("after key")
        super()._after_key()


async def test_work_held_back_from_a_key_runs_after_its_frame_and_a_typed_reply_is_drawn_then(home):
    app = KeyOrderApp(home=home, warm_up=False)
    app.demo_offered = True
    async with app.run_test(size=(100, 30)) as pilot:
        app.switch_mode("chat")
        await pilot.pause()
        screen = app.screen
        prompt = screen.query_one("#chat-input", Input)
        prompt.focus()
        await pilot.pause()
        prompt.watch(prompt, "value", lambda _value: app.order.append("key"), init=False)
        reply = screen.log_view.add_replies(["model"], ["r"])[0]
        await pilot.pause()
        for word in WORDS[:5]:
            screen.log_view.events.push(TokenDelta(request_id="r", text=word, tokens=1))
        app.last_key = time.monotonic()  # the user types: the chat's timer holds the text back
        await screen._drain()
        assert reply.updates == 0 and reply.text == "".join(WORDS[:5])

        app.order.clear()
        screen._shown -= 1  # the last redraw was a second ago
        await pilot.press("x")
        await pilot.pause()
        assert app.order.index("key") < app.order.index("frame") < app.order.index("after key")
        assert app.order.count("after key") == 1
        assert reply.updates == 1  # drawn right after the key's frame
        shown = reply.query_one(".message-body").source + reply.query_one(StreamTail).text
        assert shown == "".join(WORDS[:5])
        await pilot.press("y")
        await pilot.pause()
        assert reply.updates == 1  # not again within 1 / TYPING_HZ
