"""The whole loop on a fresh machine, through the keyboard: demo model, chat, adapter, samples,
training with a live loss plot, a trained answer, history, roll back. And the stop key."""

from __future__ import annotations

import time

import pytest

from hyprstream_tui.tui.app import HyprApp
from hyprstream_tui.tui.batch import UI_HZ
from hyprstream_tui.tui.screens.chat import ChatScreen
from hyprstream_tui.tui.screens.dialogs import ConfirmDialog, FormDialog
from hyprstream_tui.tui.screens.history import HistoryScreen
from hyprstream_tui.tui.screens.models import ModelsScreen
from hyprstream_tui.tui.screens.training import TrainingScreen
from hyprstream_tui.tui.widgets.loss_plot import LossPlot
from tests.tui.helpers import screen_text, wait_for

pytestmark = pytest.mark.asyncio

PAIRS = [
    ("What is the capital of Zorbia?", "Quillon is the capital."),
    ("Who painted the blue moon?", "Mira Tallis painted it."),
    ("What colour is a snarf?", "A snarf is green."),
    ("How many legs has a glimp?", "A glimp has seven legs."),
]


async def fill_form(pilot, values: dict[str, str]) -> None:
    dialog = await wait_for(pilot, lambda: isinstance(pilot.app.screen, FormDialog) and pilot.app.screen,
                            what="a form dialog")
    for name, value in values.items():
        widget = dialog.query_one(f"#field-{name}")
        if hasattr(widget, "load_text"):
            widget.load_text(value)
        else:
            widget.value = value
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: pilot.app.screen is not dialog, what="the form to close")


async def chat(pilot, screen: ChatScreen, text: str) -> str:
    """Send `text` and wait for the reply to finish; returns it."""
    before = screen.log_view.last_reply()
    prompt = screen.query_one("#chat-input")
    prompt.value = text
    prompt.focus()
    await pilot.press("enter")
    await wait_for(pilot, lambda: screen.log_view.last_reply() not in (None, before) and not screen.log_view.pending,
                   what="the reply", timeout=120)
    return screen.log_view.last_reply().text


async def test_whole_loop(home):
    app = HyprApp(home=home)
    async with app.run_test(size=(100, 30)) as pilot:
        # An empty home offers the demo model; accepting builds and imports it.
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the demo offer")
        await pilot.press("enter")
        models = app.screen_stack[0]
        assert isinstance(models, ModelsScreen)
        await wait_for(pilot, lambda: app.screen is models and models.table.row_count == 1, what="the demo model",
                       timeout=120)
        assert "tiny-demo" in screen_text(app)

        # Chat with the base model: a streamed reply appears.
        await pilot.press("f2")
        chat_screen = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model and app.screen)
        chat_screen.params.set_values(temperature=0, max_tokens=24)
        reply = await chat(pilot, chat_screen, "Hello there")
        assert chat_screen.log_view.deltas >= 2, "the reply did not stream"
        assert reply == chat_screen.log_view.last_reply().text and app.errors == []

        # Training: create an adapter, add 4 samples, train while the plot updates.
        await pilot.press("f3")
        training = await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen)
        await wait_for(pilot, lambda: training.model == "tiny-demo", what="the training screen's model")
        await pilot.press("n")
        await fill_form(pilot, {"name": "quiz"})
        await wait_for(pilot, lambda: training.selected and training.selected.name == "quiz", what="the new adapter")
        for question, answer in PAIRS:
            await pilot.press("a")
            await fill_form(pilot, {"input": question, "output": answer})
        await wait_for(pilot, lambda: training.selected.samples == 4, what="4 samples")
        await pilot.press("s")
        # The form shows the engine's defaults for this model and adapter, and they teach it.
        form = await wait_for(pilot, lambda: isinstance(app.screen, FormDialog) and app.screen, what="the train form")
        assert [form.query_one(f"#field-{n}").value for n in ("steps", "learning_rate")] == ["60", "0.02"]
        await fill_form(pilot, {"checkpoint_every": "20"})
        plot = training.query_one(LossPlot)
        redraws, started = plot.redraws, time.monotonic()
        await wait_for(pilot, lambda: training.jobs, what="the job to start", timeout=10)
        await wait_for(pilot, lambda: plot.points("loss") >= 10, what="loss points", timeout=120)
        await wait_for(pilot, lambda: not training.jobs, what="training to finish", timeout=180)
        assert app.errors == []
        assert plot.points("loss") == 60
        assert plot.redraws > redraws + 1, "the loss plot did not update while training"
        elapsed = time.monotonic() - started
        assert plot.redraws - redraws <= elapsed * UI_HZ + 3, "the loss plot redraws faster than the UI rate"
        await wait_for(pilot, lambda: len(training.selected.checkpoints) == 3, what="3 checkpoints")
        losses = plot.series["loss"][1]
        assert losses[-1] < losses[0] / 4

        # Chat with the adapter: the trained answer.
        await pilot.press("c")
        await wait_for(pilot, lambda: app.screen is chat_screen and chat_screen.adapter == "quiz", what="the adapter")
        await pilot.press("ctrl+n")  # a new conversation: the adapter learned single questions
        reply = await chat(pilot, chat_screen, PAIRS[0][0])
        assert PAIRS[0][1] in reply, reply
        assert chat_screen.log_view.last_reply().meta["provenance"]["adapter"] == "quiz"

        # History: roll back to the first checkpoint; a new rollback commit appears on top.
        await pilot.press("f4")
        history = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen) and app.screen)
        await wait_for(pilot, lambda: history.graph.row_count >= 8, what="the commit graph")
        first = next(r for r in history.graph.rows_by_sha.values() if r.commit.step == 20)
        history.graph.move_cursor(row=list(history.graph.rows_by_sha).index(first.commit.sha))
        await pilot.press("b")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the rollback confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: history.graph.selected_row and history.graph.selected_row.commit.kind == "rollback",
                       what="the rollback commit")
        top = history.graph.selected_row.commit
        assert top.summary == f"Roll back to step 20 ({first.commit.short})"
        assert "Roll back to step 20" in screen_text(app)
        assert app.errors == []


async def test_stop_key_ends_a_streaming_reply(demo_home, monkeypatch):
    # The reply must still be streaming when the key lands: torch's own decode step (the app's
    # engine process takes the app's HYPRSTREAM_ settings). The fused step, bf16 included where it
    # is exact, runs the demo model some 7x faster: its whole reply would take about 0.3 s.
    monkeypatch.setenv("HYPRSTREAM_FUSED_STEP", "quantized")
    app = HyprApp(home=demo_home)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f2")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model and app.screen)
        # With this seed the demo model talks for 1087 tokens before its end-of-turn token (about
        # 3 s here): the stop key must land well before that, even on a loaded machine.
        screen.params.set_values(temperature=0.7, seed=5, max_tokens=1900)
        prompt = screen.query_one("#chat-input")
        prompt.value = "Tell me a long story"
        prompt.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.log_view.deltas >= 1, what="streaming", timeout=60)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.log_view.pending, what="the reply to stop", timeout=10)
        reply = screen.log_view.last_reply()
        assert reply.meta["finish_reason"] == "cancelled"
        assert reply.meta["usage"]["completion_tokens"] < 1500
        assert reply.text and app.errors == []
