"""One line under the chat: tokens used of the model's window, and what was left out."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

BAR = 12


class ContextMeter(Static):
    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.used, self.window, self.dropped = 0, 0, 0

    def set_usage(self, *, used: int | None = None, window: int | None = None, dropped: int | None = None) -> None:
        if used is not None:
            self.used = used
        if window is not None:
            self.window = window
        if dropped is not None:
            self.dropped = dropped
        self.update(self._render_line())

    def _render_line(self) -> Text:
        if not self.window:
            return Text(f"context {self.used} tokens", style="dim")
        share = min(1.0, self.used / self.window)
        filled = round(share * BAR)
        style = "red" if share > 0.9 else "yellow" if share > 0.7 else "green"
        line = Text.assemble("context ", ("█" * filled, style), ("░" * (BAR - filled), "dim"),
                             f" {self.used}/{self.window} tokens")
        if self.dropped:
            line.append(f" · {self.dropped} old messages left out of the prompt", style="yellow")
        return line
