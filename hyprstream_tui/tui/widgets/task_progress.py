"""A one-line task strip: what is running, a progress bar, and how to cancel it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar


class TaskProgress(Horizontal):
    def compose(self) -> ComposeResult:
        yield Label("", id="task-label")
        yield ProgressBar(total=None, show_eta=True, id="task-bar")

    def start(self, label: str) -> None:
        self.query_one("#task-label", Label).update(label)
        self.query_one("#task-bar", ProgressBar).update(total=None, progress=0)
        self.add_class("active")

    def advance_to(self, label: str, done: float, total: float | None) -> None:
        self.query_one("#task-label", Label).update(label)
        self.query_one("#task-bar", ProgressBar).update(total=total or None, progress=done)

    def finish(self) -> None:
        self.remove_class("active")
