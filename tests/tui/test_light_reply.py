"""A reply while the engine's process is still starting (issue 21: the TUI switching models within
the cold target). The app's engine runs in a child forked from a forkserver that imports torch
first, some 4 s after the app opens; until it is up, a model whose step image the engine wrote
(fp32 or quantized through the fused step) answers from that image in the app's process, without
torch, with the engine's reply and provenance (`Backend._light_engine`, `engine/light.py`)."""

from __future__ import annotations

import threading

import pytest

from hyprstream_tui.engine.tuned import step

pytestmark = [pytest.mark.asyncio,
              pytest.mark.skipif(step.library() is None,
                                 reason=f"the fused step cannot run on this machine: {step.status()}")]


async def test_a_reply_before_the_engine_process_is_up_comes_from_the_step_image(demo_home, monkeypatch):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.events import GenerationDone
    from hyprstream_tui.engine.loader import LoadOptions
    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from hyprstream_tui.tui import engine_link
    from hyprstream_tui.tui.app import HyprApp
    from hyprstream_tui.tui.screens.chat import ChatScreen
    from tests.tui.helpers import wait_for

    # The app's engine loads with the default options: fp32 on a CPU without native bf16 (this
    # machine class), the loader's rule (`pick_dtype`), which the light engine asks; held to that here.
    from hyprstream_tui.engine import loader

    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: False)
    # The library built in this home and marked as checked on this CPU, as the engine leaves it on
    # its first load in a home (in this process it was loaded in an earlier test's home)
    from hyprstream_tui.engine.tuned import step_abi

    step_abi.mark_checked(step.compile_library())
    reference = Engine(store=Store(Paths.from_env(demo_home)), options=LoadOptions(dtype="float32"), max_models=1)
    want = reference.chat(DEMO_NAME, [{"role": "user", "content": "Hi"}],
                          SamplingParams(temperature=0, max_tokens=6)).result()  # also writes the image
    reference.close()
    assert isinstance(want, GenerationDone) and want.text

    # A stand-in for the forkserver still importing torch: the engine's process is not up until released.
    release, asked = threading.Event(), threading.Event()
    real_make = engine_link.make_engine

    def slow_make(store, *, remote=None):
        asked.set()
        release.wait(120)
        return real_make(store, remote=remote)

    monkeypatch.setattr(engine_link, "make_engine", slow_make)
    app = HyprApp(home=demo_home)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f2")
            chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model and app.screen)
            chat.params.set_values(temperature=0, max_tokens=6)
            await wait_for(pilot, asked.is_set, what="the app starting its engine")
            box = chat.query_one("#chat-input")
            box.value = "Hi"
            box.focus()
            await pilot.press("enter")
            await wait_for(pilot, lambda: chat.generations and not chat.log_view.pending and chat.request is None,
                           what="the reply", timeout=60)
            assert not release.is_set() and app.backend._engine is None  # not the engine's process
            [reply] = [m for m in app.backend.conversations.messages(chat.conversation_id) if m.role == "assistant"]
            assert reply.content == want.text
            assert reply.meta["provenance"]["dtype"] == "float32"
            assert reply.meta["provenance"]["model_commit"] == want.provenance.model_commit
            assert app.errors == []
            release.set()
    finally:
        release.set()
