"""One chat message: a header, the text (Markdown for replies, streamed in), and its provenance
(model commit, adapter commit, parameters, seed, tokens/s) shown on demand."""

from __future__ import annotations

import re
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from hyprstream_tui.tui.conversations import format_provenance
from hyprstream_tui.tui.widgets.stream_tail import StreamTail, printable

_FENCE = re.compile(r" {0,3}(```|~~~)")


def block_end(text: str, fenced: bool) -> tuple[int, bool]:
    """Where the complete Markdown blocks of `text` end: just after its last blank line outside a
    code fence (0 if none), and whether a fence is open there. `fenced`: one is open at the start.
    An imperfect guess costs nothing in the end: Markdown re-parses its last block as text comes."""
    cut, cut_fenced, pos = 0, fenced, 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith("\n"):
            break  # not complete yet
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and not line.strip() and pos > 1:
            cut, cut_fenced = pos, fenced
    return cut, cut_fenced


class ChatMessage(Vertical):
    def __init__(self, role: str, text: str = "", *, label: str = "", meta: dict[str, Any] | None = None,
                 message_id: int | None = None, streaming: bool = False) -> None:
        super().__init__(classes=f"message {role}" + (" streaming" if streaming else ""))
        self.role, self.text, self.label = role, text, label
        self.meta: dict[str, Any] = dict(meta or {})
        self.message_id = message_id
        self.side: str | None = None  # a reply's place: "a" (alone, or left in compare mode) or "b"
        self.updates = 0  # how many batches of text reached the body (tests check batching)
        self._pending = ""  # streamed text not yet shown
        self._stream: MarkdownStream | None = None
        self._tail = ""  # shown text of the block being written (in the StreamTail, not yet in Markdown)
        self._fenced = False  # a code fence is open at the end of what Markdown has

    def compose(self) -> ComposeResult:
        yield Label(self.label or self.role, classes="message-role")
        if self.role == "assistant":
            yield Markdown(printable(self.text), classes="message-body")
            if self.streaming:
                yield StreamTail(classes="message-tail")
        else:
            yield Static(printable(self.text), classes="message-body", markup=False)
        yield Static(format_provenance(self.meta) if self.meta else "", classes="provenance", markup=False)

    @property
    def streaming(self) -> bool:
        return self.has_class("streaming")

    def append(self, delta: str) -> None:
        self.text += delta
        self._pending += delta

    async def flush(self) -> None:
        """Show the text that arrived since the last call (the screen calls this a few times a
        second). While the reply streams, the block being written grows in a `StreamTail` (a
        repaint of a few lines), and each block goes to Markdown once it is complete: Markdown
        appends it, it does not parse the reply again."""
        if not self._pending or not self.is_mounted:
            return
        text, self._pending = self._pending, ""
        self.updates += 1
        if self.role != "assistant":  # a Static (see compose)
            self.query_one(".message-body", Static).update(printable(self.text))
            return
        body = self.query_one(".message-body", Markdown)
        tails = self.query(StreamTail)
        if not tails:
            await self._to_markdown(body, text)
            return
        tail = tails.first()
        pending = self._tail + text
        cut, self._fenced = block_end(pending, self._fenced)
        if cut:
            await self._to_markdown(body, pending[:cut])
            self._tail = pending[cut:]
            tail.set_text(self._tail)
        else:
            self._tail = pending
            tail.append(text)

    async def _to_markdown(self, body: Markdown, text: str) -> None:
        if self._stream is None:
            self._stream = Markdown.get_stream(body)
        await self._stream.write(printable(text))

    async def finish(self, *, text: str | None = None, meta: dict[str, Any] | None = None) -> None:
        """The reply is complete: `text` (when given) is its final text, `meta` its provenance.
        Both are set before the screen work starts, so readers never see a half-finished reply."""
        replaced = False
        if text is not None and text != self.text:
            self.text, replaced = text, True
        if meta is not None:
            self.meta = dict(meta)
        await self.flush()
        if self._tail:
            await self._to_markdown(self.query_one(".message-body", Markdown), self._tail)
            self._tail = ""
        await self.query(StreamTail).remove()
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if replaced:
            await self.query_one(".message-body", Markdown).update(printable(self.text))
        self.remove_class("streaming")
        if meta is not None:
            self.query_one(".provenance", Static).update(format_provenance(self.meta))

    def toggle_provenance(self, show: bool) -> None:
        self.set_class(show and bool(self.meta), "show-provenance")
