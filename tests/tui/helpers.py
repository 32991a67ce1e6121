"""Helpers for the TUI tests: the screen as plain text, and waiting for a condition."""

from __future__ import annotations

import io
import time
from typing import Callable

from rich.console import Console


def screen_text(app) -> str:
    """What the terminal shows now, as text (the same render as a screenshot)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system="truecolor",
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def wait_for(pilot, condition: Callable[[], object], *, timeout: float = 60.0, what: str = "condition") -> object:
    """Let the app run until `condition()` is truthy; fail with what the screen shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}; errors {pilot.app.errors}; screen:\n{screen_text(pilot.app)}")


def count_layouts(screen) -> list[int]:
    """Count the screen's layouts (every widget arranged again) from now on: read `[0]`."""
    count = [0]
    refresh_layout = screen._refresh_layout

    def counted(*args, **kwargs):
        count[0] += 1
        return refresh_layout(*args, **kwargs)

    screen._refresh_layout = counted
    return count
