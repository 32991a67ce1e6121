"""History beyond rollback: tag a milestone, answer one prompt with two commits side by side,
chat with one commit; and every action of every screen is in the command palette."""

from __future__ import annotations

import pytest
from textual.command import CommandPalette
from textual.containers import Horizontal

from hyprstream_tui.tui.app import MODE_KEYS, HyprApp
from hyprstream_tui.tui.screens.chat import ChatScreen
from hyprstream_tui.tui.screens.dialogs import FormDialog
from hyprstream_tui.tui.screens.history import HistoryScreen
from tests.tui.conftest import add_adapter, add_checkpoint
from tests.tui.helpers import wait_for

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
