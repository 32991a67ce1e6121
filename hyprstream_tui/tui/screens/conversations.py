"""The saved conversations: open, rename, delete, export to Markdown or JSONL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from hyprstream_tui import units

if TYPE_CHECKING:
    from hyprstream_tui.tui.conversations import Conversation


class ConversationsDialog(ModalScreen[tuple[str, int] | None]):
    """Dismisses with (action, conversation id): open, rename, delete, markdown, jsonl."""

    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("enter", "pick('open')", "Open"),
        Binding("r", "pick('rename')", "Rename"),
        Binding("d,delete", "pick('delete')", "Delete"),
        Binding("m", "pick('markdown')", "Export .md"),
        Binding("j", "pick('jsonl')", "Export .jsonl"),
    ]

    def __init__(self, conversations: Sequence["Conversation"]) -> None:
        super().__init__(classes="dialog")
        self.conversations = list(conversations)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box text-box"):
            yield Label("Conversations", classes="dialog-title")
            options = [Option(f"{c.title}  ·  {c.model}{':' + c.adapter if c.adapter else ''}  ·  {units.when(c.updated)}",
                              id=str(c.id)) for c in self.conversations]
            yield OptionList(*options, id="conversation-list")
            yield Static("enter open · r rename · d delete · m export Markdown · j export JSONL · esc close"
                         if options else "No saved conversations yet.", classes="dialog-note", markup=False)

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def action_pick(self, action: str) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is None or not self.conversations:
            return
        self.dismiss((action, self.conversations[options.highlighted].id))

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(("open", self.conversations[event.option_index].id))
