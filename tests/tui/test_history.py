"""History beyond rollback: tag a milestone, answer one prompt with two commits side by side,
chat with one commit; one selected commit's own loss curve and metrics; and every action of every
screen is in the command palette."""

from __future__ import annotations

import pytest
from textual.command import CommandPalette
from textual.containers import Horizontal

from hyprstream_tui.tui.app import MODE_KEYS, HyprApp
from hyprstream_tui.tui.screens.chat import ChatScreen
from hyprstream_tui.tui.screens.dialogs import FormDialog
from hyprstream_tui.tui.screens.history import HistoryScreen
from tests.tui.helpers import add_adapter, add_checkpoint
from tests.tui.helpers import screen_text, wait_for

pytestmark = pytest.mark.asyncio


async def open_history(pilot) -> HistoryScreen:
    await pilot.press("f4")
    return await wait_for(pilot, lambda: isinstance(pilot.app.screen, HistoryScreen) and pilot.app.screen.graph.row_count
                          and pilot.app.screen)


def row_of(history: HistoryScreen, sha: str) -> int:
    return list(history.graph.rows_by_sha).index(sha)


async def test_tag_compare_and_chat_with_commits(demo_home):
    add_adapter(demo_home)
    first = add_checkpoint(demo_home, step=10, loss=2.0)
    second = add_checkpoint(demo_home, step=20, loss=1.0)
    app = HyprApp(home=demo_home)
    async with app.run_test(size=(100, 30)) as pilot:
        history = await open_history(pilot)
        # Tag the first checkpoint.
        history.graph.move_cursor(row=row_of(history, first.sha))
        await pilot.press("t")
        form = await wait_for(pilot, lambda: isinstance(app.screen, FormDialog) and app.screen)
        form.query_one("#field-label").value = "milestone"
        await pilot.press("enter")
        await wait_for(pilot, lambda: history.graph.rows_by_sha.get(first.sha)
                       and history.graph.rows_by_sha[first.sha].commit.tags == ("quiz/milestone",), what="the tag")

        # Mark both checkpoints: the comparison shows, then C answers a prompt with both.
        for commit in (first, second):
            history.graph.move_cursor(row=row_of(history, commit.sha))
            await pilot.press("space")
        await wait_for(pilot, lambda: len(history.query_one("LossPlot").series) == 2, what="the comparison")
        assert history.graph.marked == [first.sha, second.sha]
        await pilot.press("C")
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.rev == first.sha
                              and app.screen)
        assert chat.compare and chat.compare_spec == f"tiny-demo:quiz@{second.sha}"
        chat.params.set_values(temperature=0, max_tokens=5)
        chat.query_one("#chat-input").value = "Hi"
        chat.query_one("#chat-input").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.generations == 1 and not chat.log_view.pending and chat.request is None,
                       what="both replies", timeout=120)
        left, right = chat.log_view.query(Horizontal).filter(".compare-pair").last().children
        assert left.meta["provenance"]["adapter_commit"] == first.sha
        assert right.meta["provenance"]["adapter_commit"] == second.sha

        # Back in History, c chats with the highlighted commit alone.
        history = await open_history(pilot)
        history.graph.move_cursor(row=row_of(history, second.sha))
        await pilot.press("c")
        await wait_for(pilot, lambda: app.screen is chat and chat.rev == second.sha, what="the pinned commit")
        assert app.errors == []


async def test_every_binding_is_in_the_command_palette(demo_home):
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        for mode, key, _title in MODE_KEYS:
            await pilot.press(key)
            screen = await wait_for(pilot, lambda: getattr(app.screen, "MODE", None) == mode and app.screen)
            titles = {command.title for command in app.get_system_commands(screen)}
            for binding in type(screen).BINDINGS:
                assert f"{screen.MODE_TITLE}: {binding.description}" in titles, (mode, binding.description)
            assert {"Go to Models", "Go to Chat", "Go to Train", "Go to History", "Theme", "Quit"} <= titles

        # Through the palette itself: type a command, run it.
        await pilot.press("ctrl+p")
        palette = await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette) and app.screen)
        await pilot.press(*"Go to Models")
        await wait_for(pilot, lambda: palette.query("CommandList Option") or palette.query_one("CommandList").option_count,
                       what="palette matches")
        await pilot.press("enter")
        await wait_for(pilot, lambda: getattr(app.screen, "MODE", None) == "models", what="the Models screen")


def checkpoint_with_steps(home, *, steps: int, elapsed: float, adapter: str = "quiz"):
    """A checkpoint as training writes it: metrics/steps.jsonl with one line per step, and the
    trailers (loss, lr, samples, elapsed seconds) in the commit message."""
    import json

    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from tests.tui.helpers import lora_weights

    lines = [json.dumps({"step": s, "loss": round(3.0 * 0.97 ** s, 4), "lr": 0.001, "tokens_per_s": 900.0,
                         "time": 1_767_225_600 + s}) for s in range(1, steps + 1)]
    files = {"adapter/adapter_model.safetensors": lora_weights(steps, scale=0.5),
             "metrics/steps.jsonl": ("\n".join(lines) + "\n").encode()}
    trailers = {"step": steps, "loss": round(3.0 * 0.97 ** steps, 4), "lr": 0.001, "samples": steps * 4,
                "elapsed": elapsed}
    store = Store(Paths.from_env(home))
    return store.write_files(DEMO_NAME, adapter, files, f"Checkpoint at step {steps}", trailers)


async def test_one_selected_commit_shows_its_own_loss_curve_until_two_are_marked(demo_home):
    add_adapter(demo_home)
    first = checkpoint_with_steps(demo_home, steps=20, elapsed=120.0)
    second = checkpoint_with_steps(demo_home, steps=63, elapsed=694.15)
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        history = await open_history(pilot)
        plot = history.query_one("LossPlot")
        history.graph.move_cursor(row=row_of(history, second.sha))
        await wait_for(pilot, lambda: list(plot.series) == [second.short] and plot.points(second.short) == 63,
                       what="the selected commit's curve")
        await pilot.pause(0.3)  # the plot redraws a few times a second
        assert "no steps yet" not in screen_text(app)

        # Another commit highlighted: its curve replaces the first.
        history.graph.move_cursor(row=row_of(history, first.sha))
        await wait_for(pilot, lambda: list(plot.series) == [first.short] and plot.points(first.short) == 20,
                       what="the other commit's curve")

        # One mark: still the highlighted commit's curve; two marks: the comparison.
        await pilot.press("space")
        history.graph.move_cursor(row=row_of(history, second.sha))
        await wait_for(pilot, lambda: list(plot.series) == [second.short], what="the curve after one mark")
        await pilot.press("space")
        await wait_for(pilot, lambda: set(plot.series) == {first.short, second.short}, what="the comparison")
        assert plot.points(first.short) == 20 and plot.points(second.short) == 63

        # Unmarking one goes back to the highlighted commit alone.
        await pilot.press("space")
        await wait_for(pilot, lambda: list(plot.series) == [second.short] and plot.points(second.short) == 63,
                       what="the single curve again")

        # A commit without metrics/steps.jsonl (the adapter's creation) has no curve.
        created = next(sha for sha, r in history.graph.rows_by_sha.items() if r.commit.kind == "create")
        history.graph.move_cursor(row=row_of(history, created))
        await wait_for(pilot, lambda: list(plot.series) == [created[:7]] and plot.points(created[:7]) == 0,
                       what="the empty curve")
        await pilot.pause(0.3)
        assert "loss: no steps yet" in screen_text(app)
        assert app.errors == []


def detail_row(app, key: str) -> list[str] | None:
    """The words of the screen line that starts with `key` (a row of the commit detail)."""
    return next((line.split() for line in screen_text(app).splitlines() if line.split()[:1] == [key]), None)


async def test_commit_detail_shows_elapsed_time_as_a_duration(demo_home):
    add_adapter(demo_home)
    commit = checkpoint_with_steps(demo_home, steps=63, elapsed=694.15)
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        history = await open_history(pilot)
        history.graph.move_cursor(row=row_of(history, commit.sha))
        await wait_for(pilot, lambda: detail_row(app, "elapsed"), what="the commit's detail")
        assert detail_row(app, "elapsed")[:2] == ["elapsed", "11m34s"]
        text = screen_text(app)
        assert "694.1500" not in text and "694.15" not in text
        assert app.errors == []
