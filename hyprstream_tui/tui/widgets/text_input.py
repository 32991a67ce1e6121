"""A one-line text input whose keys redraw only itself."""

from __future__ import annotations

from textual.geometry import Size
from textual.widget import Widget
from textual.widgets import Input


class TextInput(Input):
    """Textual's `Input`, without a layout of the whole screen on every key.

    `Input` sets its virtual width to its text's width on each change, and `virtual_size` is a
    layout reactive: every key asks the screen to arrange every widget again. Beside a long chat
    log that is most of a key's frame (a frame that draws the input alone is several times
    cheaper). An input of fixed size does not need it: the new virtual width is stored without
    that request, scrolling reads it from there, and the change of value repaints the input.
    An input sized by its content (`width: auto`) keeps Textual's behaviour."""

    def _watch_value(self, value: str) -> None:
        if not self.styles.auto_dimensions:
            self.set_reactive(Widget.virtual_size, Size(self.content_width, 1))
        super()._watch_value(value)
