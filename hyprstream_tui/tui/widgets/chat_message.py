"""One chat message: a header, the text (Markdown for replies, streamed in), and its provenance
(model commit, adapter commit, parameters, seed, tokens/s) shown on demand."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from hyprstream_tui.tui.conversations import format_provenance


class ChatMessage(Vertical):
    def __init__(self, role: str, text: str = "", *, label: str = "", meta: dict[str, Any] | None = None,
                 message_id: int | None = None, streaming: bool = False) -> None:
        super().__init__(classes=f"message {role}" + (" streaming" if streaming else ""))
        self.role, self.text, self.label = role, text, label
        self.meta: dict[str, Any] = dict(meta or {})
        self.message_id = message_id
        self.updates = 0  # how many batches of text reached the body (tests check batching)
        self._pending = ""  # streamed text not yet shown
        self._stream: MarkdownStream | None = None

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
        self._pending += delta

    async def flush(self) -> None:
        """Show the text that arrived since the last call (the screen calls this a few times a
        second). Markdown is appended, not re-parsed: only the last block is rebuilt."""
        if not self._pending or not self.is_mounted:
            return
        text, self._pending = self._pending, ""
        self.updates += 1
        body = self.query_one(".message-body")
        if not isinstance(body, Markdown):
            body.update(self.text)
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(body)
        await self._stream.write(text)

    async def finish(self, *, text: str | None = None, meta: dict[str, Any] | None = None) -> None:
        await self.flush()
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if text is not None and text != self.text:
            self.text = text
            await self.query_one(".message-body", Markdown).update(text)
        self.remove_class("streaming")
        if meta is not None:
            self.meta = dict(meta)
            self.query_one(".provenance", Static).update(format_provenance(self.meta))

    def toggle_provenance(self, show: bool) -> None:
        self.set_class(show and bool(self.meta), "show-provenance")
