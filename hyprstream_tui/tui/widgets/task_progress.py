"""A one-line task strip: what is running, a progress bar, and how to cancel it. Its parts are
built on first use, so the Models screen's first frame does not pay for them."""

from __future__ import annotations

from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar


class TaskProgress(Horizontal):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._label: Label | None = None
        self._bar: ProgressBar | None = None

    def _parts(self) -> tuple[Label, ProgressBar]:
        if self._label is None or self._bar is None:
            self._label, self._bar = Label("", id="task-label"), ProgressBar(total=None, show_eta=True, id="task-bar")
            self.mount(self._label, self._bar)
        return self._label, self._bar

    def start(self, label: str) -> None:
        text, bar = self._parts()
        text.update(label)
        bar.update(total=None, progress=0)
        self.add_class("active")

    def advance_to(self, label: str, done: float, total: float | None) -> None:
        text, bar = self._parts()
        text.update(label)
        bar.update(total=total or None, progress=done)

    def finish(self) -> None:
        self.remove_class("active")
