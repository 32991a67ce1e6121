"""Sessions of `hyprstream web`, driven over the websocket as textual.js drives it: the cap and
its page, the app process and engine child ending with their tab, and one store for all tabs."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import httpx
import pytest

from tests.web.live import CTRL_S, F3, Tab, alive, describe, engine_children, wait_gone

pytestmark = pytest.mark.asyncio
CTRL_A, CTRL_K = "\x01", "\x0b"


async def status_of_page(server) -> int:
    async with httpx.AsyncClient(follow_redirects=True) as client:
        return (await client.get(server.page())).status_code


def app_tree(server) -> list:
    """The processes of the server's sessions: each app, its forkserver, engine child and so on."""
    return server.descendants()


async def test_past_max_sessions_the_next_visitor_gets_a_clear_page(web):
    server = web("--max-sessions", "1")
    async with aiohttp.ClientSession() as session:
        tab = await Tab.open(session, server)
        await tab.wait_for("tiny-demo", timeout=90)  # the app is up, on the Models screen
        async with httpx.AsyncClient(follow_redirects=True) as client:
            busy = await client.get(server.page())
        assert busy.status_code == 503
        assert "All sessions are in use" in busy.text and "at most 1 session at once" in busy.text
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(server.ws(), headers={"Origin": server.origin})
        assert refused.value.status == 503
        assert len([p for p in app_tree(server) if "hyprstream_tui" in " ".join(p.cmdline())]) >= 1

        await tab.close()  # the tab goes: its session ends and frees its place
        deadline = time.monotonic() + 40
        while await status_of_page(server) != 200:
            assert time.monotonic() < deadline, "the closed session still counts"
            await asyncio.sleep(0.2)


async def test_closing_the_websocket_ends_the_app_and_its_engine_child(web):
    server = web()
    async with aiohttp.ClientSession() as session:
        tab = await Tab.open(session, server)
        await tab.wait_for("tiny-demo", timeout=90)
        deadline = time.monotonic() + 60  # the engine child starts with the app's warm-up
        while not engine_children(tree := app_tree(server)) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert engine_children(tree), describe(tree)  # the app, its forkserver, the engine child
        await tab.close()
        left = await asyncio.to_thread(wait_gone, tree, 40)
    assert not left, f"orphans: {describe(left)}"
    assert server.proc.poll() is None and app_tree(server) == []


async def test_two_tabs_share_one_store_and_its_one_writer_lock(web, demo_home):
    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from hyprstream_tui.store.locks import is_locked, read_info
    from tests.tui.helpers import add_adapter

    adapter = add_adapter(demo_home)  # `quiz`, with 4 samples
    lock = Store(Paths.from_env(demo_home)).train_lock_path(DEMO_NAME, adapter.uuid)
    server = web("--max-sessions", "2")
    async with aiohttp.ClientSession() as session:
        first, second = [await Tab.open(session, server) for _ in range(2)]
        for tab in (first, second):
            await tab.wait_for("tiny-demo", timeout=90)
            at = len(tab.text)
            await tab.press(F3)
            await tab.wait_for("idle", timeout=60, after=at)  # `quiz` selected: "quiz  idle" in its pane

        # The first tab trains `quiz` for many steps ...
        at = len(first.text)
        await first.press("s")
        await first.wait_for("Train quiz", timeout=60, after=at)
        await first.press(CTRL_A, CTRL_K, "3000", CTRL_S)
        deadline = time.monotonic() + 60
        while not is_locked(lock):
            assert time.monotonic() < deadline, f"training did not start:\n{first.text[-2000:]}"
            await asyncio.sleep(0.2)

        # ... and the second tab, another app process on the same store, may not.
        at = len(second.text)
        await second.press("s")
        await second.wait_for("Train quiz", timeout=60, after=at)
        await second.press(CTRL_S)
        await second.wait_for("training already", timeout=60, after=at)
        assert is_locked(lock)

        tree = app_tree(server)
        trainer = read_info(lock)["pid"]
        assert trainer in {p.pid for p in engine_children(tree)}, describe(tree)  # a child of tab 1's app
        await first.close()
        await second.close()
        left = await asyncio.to_thread(wait_gone, tree, 60)
    assert not left, f"orphans: {describe(left)}"
    assert not is_locked(lock) and alive(tree) == []


async def test_ctrl_c_on_the_server_ends_every_session(web):
    """(SIGTERM takes the same path: every fixture's teardown sends it.)"""
    server = web()
    async with aiohttp.ClientSession() as session:
        tabs = [await Tab.open(session, server) for _ in range(2)]
        for tab in tabs:
            await tab.wait_for("tiny-demo", timeout=90)
        deadline = time.monotonic() + 60
        while len(engine_children(tree := app_tree(server))) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(engine_children(tree)) == 2, describe(tree)
        server.proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(server.proc.wait, 60) == 0, server.log.read_text()
        left = await asyncio.to_thread(wait_gone, tree, 40)
        assert not left, f"orphans: {describe(left)}"
        for tab in tabs:  # the browser hears that its session ended
            await asyncio.wait_for(tab.reader, 10)
