"""Chat beyond a single reply: compare mode, regenerate, edit and resend, send a reply to training,
saved conversations (list, open, export), a commit picked from the adapter's history."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import pytest
from textual.containers import Horizontal

from hyprstream_tui.tui.app import HyprApp
from hyprstream_tui.tui.screens.chat import ChatScreen
from hyprstream_tui.tui.screens.conversations import ConversationsDialog
from hyprstream_tui.tui.screens.dialogs import FormDialog, PickDialog
from tests.tui.helpers import add_adapter, add_checkpoint
from tests.tui.helpers import wait_for

pytestmark = pytest.mark.asyncio


async def send(pilot, chat: ChatScreen, text: str, replies: int = 1) -> None:
    box = chat.query_one("#chat-input")
    box.value = text
    box.focus()
    before = chat.generations
    await pilot.press("enter")
    await wait_for(pilot, lambda: chat.generations > before and not chat.log_view.pending and chat.request is None,
                   what="the replies", timeout=120)


@pytest.fixture
def checkpoint(demo_home):
    """The demo model's adapter `quiz` (4 samples) with one checkpoint: that commit."""
    add_adapter(demo_home)
    return add_checkpoint(demo_home)


@contextlib.asynccontextmanager
async def quiz_chat(home) -> AsyncIterator[tuple[HyprApp, Any, ChatScreen]]:
    """The app on the Chat screen, adapter `quiz` picked, greedy and 6 tokens a reply: (app, pilot,
    chat). The test that used it ends with no error shown."""
    app = HyprApp(home=home)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f2")
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model and app.screen)
        await wait_for(pilot, lambda: chat.query_one("#chat-adapter").value == "__base__", what="the pickers")
        chat.query_one("#chat-adapter").value = "quiz"
        await wait_for(pilot, lambda: chat.adapter == "quiz", what="the adapter")
        chat.params.set_values(temperature=0, max_tokens=6)
        yield app, pilot, chat
        assert app.errors == []


async def test_compare_mode_answers_with_the_adapter_and_the_base_side_by_side(demo_home, checkpoint):
    async with quiz_chat(demo_home) as (app, pilot, chat):
        await pilot.press("ctrl+b")
        await send(pilot, chat, "Hi")
        pair = chat.log_view.query(Horizontal).filter(".compare-pair").last()
        first, second = pair.children
        assert (first.label, second.label) == ("quiz", "tiny-demo (base)")
        assert first.meta["provenance"]["adapter_commit"] == checkpoint.sha
        assert second.meta["provenance"]["adapter"] is None
        stored = app.backend.conversations.messages(chat.conversation_id)
        assert [(m.role, m.meta.get("side")) for m in stored] == [("user", None), ("assistant", "a"), ("assistant", "b")]


async def test_regenerate_replaces_the_last_replies_on_screen_and_on_disk(demo_home, checkpoint):
    async with quiz_chat(demo_home) as (app, pilot, chat):
        await pilot.press("ctrl+b")  # a compare pair: both replies are replaced
        await send(pilot, chat, "Hi")
        old = {m.id for m in app.backend.conversations.messages(chat.conversation_id) if m.role == "assistant"}
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: chat.generations == 2 and not chat.log_view.pending and chat.request is None,
                       what="the new replies", timeout=120)
        assert [m.role for m in chat.log_view.messages()] == ["user", "assistant"]
        stored = app.backend.conversations.messages(chat.conversation_id)
        assert [m.role for m in stored] == ["user", "assistant", "assistant"] and stored[0].content == "Hi"
        assert len(old) == 2 and not old & {m.id for m in stored}


async def test_edit_brings_the_last_prompt_back_and_resend_replaces_it(demo_home, checkpoint):
    async with quiz_chat(demo_home) as (app, pilot, chat):
        await send(pilot, chat, "Hi")
        await pilot.press("ctrl+z")
        assert chat.query_one("#chat-input").value == "Hi" and chat.log_view.messages() == []
        await send(pilot, chat, "Hello")
        stored = app.backend.conversations.messages(chat.conversation_id)
        assert [m.role for m in stored] == ["user", "assistant"] and stored[0].content == "Hello"


async def test_a_reply_sent_to_training_after_an_edit_becomes_a_sample(demo_home, checkpoint):
    async with quiz_chat(demo_home) as (app, pilot, chat):
        await send(pilot, chat, "Hello")
        await pilot.press("ctrl+t")
        form = await wait_for(pilot, lambda: isinstance(app.screen, FormDialog) and app.screen)
        assert form.values()["adapter"] == "quiz" and form.values()["input"] == "Hello"
        form.query_one("#field-output").load_text("Hello! How can I help?")
        await pilot.press("ctrl+s")
        tip = lambda: app.backend.store.resolve_adapter("tiny-demo", "quiz").tip  # noqa: E731
        await wait_for(pilot, lambda: len(app.backend.samples("tiny-demo", tip())) == 5, what="the new sample")
        assert app.backend.samples("tiny-demo", tip())[-1] == {"input": "Hello", "output": "Hello! How can I help?"}


async def test_a_commit_picked_from_the_history_answers_pinned(demo_home, checkpoint):
    later = add_checkpoint(demo_home, step=20)  # the tip: the picked commit is an older one
    async with quiz_chat(demo_home) as (app, pilot, chat):
        await pilot.press("ctrl+g")
        picker = await wait_for(pilot, lambda: isinstance(app.screen, PickDialog) and app.screen)
        picker.query_one("#pick-list").highlighted = 2  # the tip, step 20, step 10
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.rev == checkpoint.sha, what="the pinned commit")
        await send(pilot, chat, "Again")
        assert later.sha != checkpoint.sha
        assert chat.log_view.last_reply().meta["provenance"]["adapter_commit"] == checkpoint.sha


async def test_saved_conversations_are_listed_exported_and_reopened(demo_home, checkpoint):
    async with quiz_chat(demo_home) as (app, pilot, chat):
        await send(pilot, chat, "Hi")
        await send(pilot, chat, "Again")
        conversation, shown = chat.conversation_id, [m.text for m in chat.log_view.messages()]
        await pilot.press("ctrl+n")
        assert chat.log_view.messages() == [] and chat.conversation_id is None
        await pilot.press("ctrl+l")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, ConversationsDialog) and app.screen)
        assert [c.title for c in dialog.conversations] == ["Hi"]
        await pilot.press("m")
        exported = demo_home / "exports" / f"{conversation}-hi.md"
        await wait_for(pilot, lambda: exported.exists(), what="the Markdown export")
        assert exported.read_text().startswith("# Hi\n")
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsDialog))
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.conversation_id == conversation and len(chat.log_view.messages()) == 4,
                       what="the reopened conversation")
        assert [m.text for m in chat.log_view.messages()] == shown


async def test_an_untrained_adapter_is_marked_and_not_sent(demo_home):
    add_adapter(demo_home, "fresh")
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f2")
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.untrained and app.screen)
        chat.query_one("#chat-adapter").value = "fresh"
        await wait_for(pilot, lambda: chat.adapter == "fresh")
        chat.query_one("#chat-input").value = "Hi"
        chat.query_one("#chat-input").focus()
        await pilot.press("enter")
        await pilot.pause()
        assert chat.log_view.messages() == [] and chat.query_one("#chat-input").value == "Hi"
