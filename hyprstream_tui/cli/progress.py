"""Rich progress bars on stderr: bytes of an import or a pull, and the columns that show time
in the units' one style (`11m34s`, as the TUI does). Imported by the handlers that draw them."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TextColumn,
                           TransferSpeedColumn)
from rich.text import Text

from hyprstream_tui import units


class ElapsedColumn(ProgressColumn):
    """Time since the task started: `42s`, `11m34s`, `1h02m` (`-` before it starts)."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        return Text(units.eta(elapsed), style="progress.elapsed")


class RemainingColumn(ProgressColumn):
    """Time left, as far as the rate tells: `1m02s`, or `-` while unknown."""

    max_refresh = 0.5  # the estimate jitters otherwise

    def render(self, task: Task) -> Text:
        if task.total is None:  # nothing to estimate from
            return Text("", style="progress.remaining")
        return Text(units.eta(task.time_remaining), style="progress.remaining")


class ByteProgress:
    """A rich progress bar fed with store/hub progress events (done/total bytes)."""

    def __init__(self, description: str) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 RemainingColumn(), transient=False, disable=not sys.stderr.isatty(),
                                 console=Console(stderr=True))
        self.task = self.progress.add_task(description, total=None)

    def __enter__(self) -> ByteProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def __call__(self, event: Any) -> None:
        if hasattr(event, "bytes_total"):  # hub download: whole-pull bytes, file i of n
            name = f"{event.relpath[-30:]} ({event.index}/{event.count})"
            self.progress.update(self.task, completed=event.bytes_done, total=event.bytes_total or None, description=name)
            return
        self.progress.update(self.task, completed=event.done, total=event.total or None, description=event.file[-40:])
