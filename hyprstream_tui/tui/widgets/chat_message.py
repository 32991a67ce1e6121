"""One chat message: a header, the text (Markdown for replies, streamed in), and its provenance
(model commit, adapter commit, parameters, seed, tokens/s) shown on demand."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static

from hyprstream_tui.tui.conversations import format_provenance


class ChatMessage(Vertical):
    def __init__(self, role: str, text: str = "", *, label: str = "", meta: dict[str, Any] | None = None,
                 message_id: int | None = None, streaming: bool = False) -> None:
        super().__init__(classes=f"message {role}" + (" streaming" if streaming else ""))
        self.role, self.text, self.label = role, text, label
        self.meta: dict[str, Any] = dict(meta or {})
        self.message_id = message_id
        self.updates = 0  # how many times the body was re-rendered (tests check batching)
        self._dirty = False

    def compose(self) -> ComposeResult:
        yield Label(self.label or self.role, classes="message-role")
        if self.role == "assistant":
            yield Markdown(self.text, classes="message-body")
        else:
            yield Static(self.text, classes="message-body", markup=False)
        yield Static(format_provenance(self.meta) if self.meta else "", classes="provenance", markup=False)

    @property
    def streaming(self) -> bool:
        return self.has_class("streaming")

    def append(self, delta: str) -> None:
        self.text += delta
        self._dirty = True

    def flush(self) -> None:
        """Re-render the body if text arrived since the last call (the screen calls this a few times a second)."""
        if not self._dirty or not self.is_mounted:
            return
        self._dirty = False
        self.updates += 1
        body = self.query_one(".message-body")
        body.update(self.text)

    def finish(self, *, text: str | None = None, meta: dict[str, Any] | None = None) -> None:
        if text is not None and text != self.text:
            self.text, self._dirty = text, True
        self.flush()
        self.remove_class("streaming")
        if meta is not None:
            self.meta = dict(meta)
            self.query_one(".provenance", Static).update(format_provenance(self.meta))

    def toggle_provenance(self, show: bool) -> None:
        self.set_class(show and bool(self.meta), "show-provenance")
