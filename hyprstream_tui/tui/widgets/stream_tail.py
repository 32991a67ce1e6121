"""The growing end of a streaming reply, drawn as plain text at a cost that does not grow with it.

A reply streams into Markdown block by block, and Textual rebuilds the last block on every update:
a paragraph (or code block) of a few thousand characters is wrapped again from its start, and its
new height lays out the whole screen, twice. While that runs, a key waits. So the block that is
still being written lives here instead: its lines are wrapped once (only the last line again when
text comes), and its height grows in steps of `STEP` lines, so most updates repaint a few lines and
lay out nothing. When the block is complete (a blank line outside a code fence), the chat message
hands it to Markdown; at the reply's end, all of it goes there.
"""

from __future__ import annotations

import re

from rich.cells import cell_len, get_character_cell_size
from rich.segment import Segment
from textual.events import Resize
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget

STEP = 4  # lines of height reserved at a time
_WORD = re.compile(r"\S+\s*|\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def printable(text: str) -> str:
    """`text` without control characters but newline and tab: what a model or a user wrote may hold
    an escape sequence, and Textual would write it to the terminal as it is."""
    return _CONTROL.sub("", text)


def wrap(text: str, start: int, width: int) -> list[tuple[int, int]]:
    """Greedy word wrap of `text[start:]` at `width` cells, as (start, end) offsets of each line.

    `start` must begin a line of an earlier wrap (or be 0): greedy wrapping depends only on where
    a line starts, so the lines before the last never change when text is added after them."""
    lines: list[tuple[int, int]] = []
    width = max(1, width)
    i = start
    while True:
        newline = text.find("\n", i)
        end = len(text) if newline < 0 else newline
        line_start, col = i, 0
        for match in _WORD.finditer(text, i, end):
            word_start = match.start()
            core = match.group().rstrip()
            core_cells = cell_len(core)
            if col and core and col + core_cells > width:  # the word goes to the next line
                lines.append((line_start, word_start))
                line_start, col = word_start, 0
            if core_cells > width:  # longer than a line: broken at the width
                pos = word_start
                for ch in core:
                    size = get_character_cell_size(ch)
                    if col and col + size > width:
                        lines.append((line_start, pos))
                        line_start, col = pos, 0
                    col += size
                    pos += len(ch)
                col += cell_len(match.group()[len(core):])
            else:
                col += cell_len(match.group())
        lines.append((line_start, end))
        if newline < 0:
            return lines
        i = newline + 1


class StreamTail(Widget):
    """Plain text that only grows, wrapped incrementally (see the module's docstring)."""

    DEFAULT_CSS = f"""
    StreamTail {{
        height: {STEP};
    }}
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.text = ""
        self._lines: list[tuple[int, int]] = []
        self._width = 0  # what the lines are wrapped at (0: not yet laid out)
        self._height = STEP  # lines reserved (at least STEP, in steps of STEP)
        self.layouts = 0  # height changes, each a layout of the screen (tests)

    def append(self, delta: str) -> None:
        delta = printable(delta).replace("\t", "    ")
        if not delta:
            return
        self.text += delta
        if not self._width:
            return
        first = len(self._lines) - 1 if self._lines else 0
        start = self._lines.pop()[0] if self._lines else 0
        self._lines.extend(wrap(self.text, start, self._width))
        self._changed(first)

    def set_text(self, text: str) -> None:
        self.text, self._lines = "", []
        self.append(text)
        if not self.text:
            self._changed(0)

    def on_resize(self, _event: Resize) -> None:
        width = self.size.width  # the content's width (the event's size includes the padding)
        if width and width != self._width:
            self._width = width
            self._lines = wrap(self.text, 0, self._width) if self.text else []
            self._changed(0)

    @property
    def line_count(self) -> int:
        return len(self._lines)

    def _changed(self, first: int) -> None:
        """Lines from `first` on changed: repaint them, or grow (a layout) when they no longer fit."""
        height = max(STEP, -(-len(self._lines) // STEP) * STEP)
        if height != self._height:
            self._height = height
            self.layouts += 1
            self.styles.height = height
        else:
            self.refresh(Region(0, first, self.size.width, height - first))

    def render_line(self, y: int) -> Strip:
        style = self.rich_style
        if y >= len(self._lines):
            return Strip.blank(self.size.width, style)
        start, end = self._lines[y]
        return Strip([Segment(self.text[start:end], style)]).adjust_cell_length(self.size.width, style)
