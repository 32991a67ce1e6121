"""`hyprstream tui --remote URL`: chat answered by a hyprstream server over the OpenAI API."""

from __future__ import annotations

import pytest

from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.tui.app import HyprApp
from hyprstream_tui.tui.screens.chat import ChatScreen
from tests.server.live import live_server, make_app
from tests.tui.helpers import add_adapter, add_checkpoint
from tests.tui.helpers import wait_for

pytestmark = pytest.mark.asyncio


async def test_chat_through_a_remote_server(demo_home, tmp_path):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    add_adapter(demo_home)
    add_checkpoint(demo_home)
    engine = Engine(store=Store(Paths.from_env(demo_home)), options=LoadOptions(dtype="float32"), threads=1)
    with live_server(make_app(engine, max_batch=2, max_queue=4)) as server:
        app = HyprApp(home=tmp_path / "empty-home", remote=server.url, warm_up=False)  # nothing local
        app.demo_offered = True
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f2")
            chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model and app.screen)
            assert chat.model == "tiny-demo"
            await wait_for(pilot, lambda: chat.query_one("#chat-adapter").value == "__base__")
            chat.query_one("#chat-adapter").value = "quiz"
            await wait_for(pilot, lambda: chat.adapter == "quiz")
            chat.params.set_values(temperature=0, max_tokens=8, seed=3)
            chat.query_one("#chat-input").value = "Hello"
            chat.query_one("#chat-input").focus()
            await pilot.press("enter")
            await wait_for(pilot, lambda: chat.log_view.last_reply() and not chat.log_view.pending, what="the reply",
                           timeout=120)
            reply = chat.log_view.last_reply()
            params = SamplingParams(temperature=0, max_tokens=8, seed=3)
            local = engine.chat("tiny-demo:quiz", [{"role": "user", "content": "Hello"}], params).result()
            assert reply.text == local.text and chat.log_view.deltas >= 1
            assert reply.meta["provenance"]["device"].startswith(server.url)
            assert app.errors == []
