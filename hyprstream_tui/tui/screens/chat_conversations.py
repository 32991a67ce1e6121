"""Saved conversations on the Chat screen: new, list, open, rename, delete, export, and keeping
the database in step when replies are regenerated or prompts edited."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work

from hyprstream_tui.tui.screens.base import HyprScreen
from hyprstream_tui.tui.screens.conversations import ConversationsDialog
from hyprstream_tui.tui.screens.dialogs import Field, FormDialog, when_given
from hyprstream_tui.tui.targets import label_of, spec_of
from hyprstream_tui.tui.widgets.chat_log import ChatLog
from hyprstream_tui.tui.widgets.context_meter import ContextMeter

if TYPE_CHECKING:
    from hyprstream_tui.tui.conversations import Conversation, StoredMessage


class ConversationActions(HyprScreen):
    """The base of ChatScreen, which sets `conversation_id` and shows targets (`load_targets`)."""

    conversation_id: int | None  # the conversation on screen; None until its first message is saved

    @property
    def log_view(self) -> ChatLog:
        return self.query_one(ChatLog)

    def load_targets(self, model: str | None, adapter: str | None) -> object:
        """Show what can answer, `model` and `adapter` chosen (ChatScreen's worker)."""
        raise NotImplementedError

    def _forget(self, ids: list[int]) -> None:
        """Delete these saved messages (by id, so a reply saved meanwhile is never caught)."""
        if ids and self.conversation_id is not None:
            self.forget(self.conversation_id, ids)

    @work(thread=True, exit_on_error=False, group="chat-store-delete")
    def forget(self, conversation_id: int, ids: list[int]) -> None:
        self.backend.conversations.delete_messages(conversation_id, ids)

    def action_new_conversation(self) -> None:
        if self.log_view.streaming:
            return
        self.conversation_id = None
        self.log_view.clear_log()
        self.query_one(ContextMeter).set_usage(used=0, dropped=0)

    def action_conversations(self) -> None:
        self.list_conversations()

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat-store")
    def list_conversations(self) -> None:
        conversations = self.backend.conversations.list()
        self.app.call_from_thread(self.app.push_screen, ConversationsDialog(conversations), self._conversation_action)

    def _conversation_action(self, choice: tuple[str, int] | None) -> None:
        if choice is None:
            return
        action, conversation_id = choice
        if action == "rename":
            self.app.push_screen(FormDialog("Rename conversation", [Field("title", "Title")], submit="Rename"),
                                 when_given(lambda v: self.conversation_op("rename", conversation_id, v["title"])))
        else:
            self.conversation_op(action, conversation_id)

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat-store")
    def conversation_op(self, action: str, conversation_id: int, title: str = "") -> None:
        store = self.backend.conversations
        if action == "open":
            conv, messages = store.get(conversation_id), store.messages(conversation_id)
            self.app.call_from_thread(self._open_conversation, conv, messages)
        elif action == "rename":
            store.rename(conversation_id, title)
            self.app.call_from_thread(self.notify, "Renamed.")
        elif action == "delete":
            store.delete(conversation_id)
            if conversation_id == self.conversation_id:
                self.app.call_from_thread(self.action_new_conversation)
            self.app.call_from_thread(self.notify, "Deleted the conversation.")
        elif action in ("markdown", "jsonl"):
            path = self.backend.export_conversation(conversation_id, action)
            self.app.call_from_thread(self.notify, f"Exported to {path}")

    def _open_conversation(self, conv: Conversation, messages: list[StoredMessage]) -> None:
        if self.log_view.streaming:
            return
        self.log_view.clear_log()
        self.conversation_id = conv.id
        for m in messages:
            if m.role == "user":
                self.log_view.add_user(m.content, message_id=m.id)
            elif m.role == "assistant":
                prov = m.meta.get("provenance") or {}
                label = label_of(spec_of(prov.get("model", conv.model), prov.get("adapter"), None))
                self.log_view.add_saved_reply(m.content, label=label, meta=m.meta, message_id=m.id,
                                              pair_with_last=m.meta.get("side") == "b")
        last = next((m for m in reversed(messages) if m.role == "assistant"), None)
        usage = (last.meta.get("usage") or {}) if last else {}
        self.query_one(ContextMeter).set_usage(used=usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0),
                                               dropped=last.meta.get("dropped_messages", 0) if last else 0)
        if conv.model:
            self.load_targets(conv.model, conv.adapter or None)
