"""Keeping the UI ahead of the work it starts.

Generation and training run in child processes (`engine.child`, `engine.train.process`); what
heavy work stays in this process (the warm-up after the first paint, which starts their
forkserver and its children with it) runs in its own thread at a lower CPU priority (nice +10:
the threads and processes it starts inherit that), and the interpreter hands the GIL over every
millisecond instead of every five. Full garbage collections, which stop the event loop for 4 to
20 ms, run where a key is least likely to wait for them (`Collections`). Set
HYPRSTREAM_TUI_YIELD=0 to turn all of it off.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")
BACKGROUND_NICE = 10
SWITCH_INTERVAL_S = 0.001


def enabled() -> bool:
    return os.environ.get("HYPRSTREAM_TUI_YIELD", "1") != "0"


def lower_priority() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread). Best effort."""
    if not enabled() or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except OSError:
        pass


def run_in_background(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` in a fresh thread at lower priority and wait for it (from a worker thread).

    A fresh thread, because a lowered priority cannot be raised again without privileges and the
    worker threads are reused for light work too."""
    box: dict[str, Any] = {}

    def target() -> None:
        lower_priority()
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the waiting worker
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"hyprstream-{getattr(fn, '__name__', 'job')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class SwitchInterval:
    """Set the GIL switch interval while the app runs; restore it after."""

    def __init__(self) -> None:
        self._saved: float | None = None

    def __enter__(self) -> "SwitchInterval":
        if enabled():
            self._saved = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            sys.setswitchinterval(self._saved)
            self._saved = None


class Collections:
    """Full collections at moments of the app's choosing while it runs.

    A full collection of what the app builds after its warm-up (widgets, rendered lines) takes
    4 to 20 ms with a chat and a training running, and Python starts one wherever an allocation
    tips its counters: often in the middle of drawing a frame, so a key pressed then waits for
    both. While the app runs, Python's own full collections are off (young generations are
    collected as usual) and the app runs one every `EVERY_S` seconds when the user is not typing,
    or right after a key's frame is on the terminal (the moment the next key is furthest away:
    `HyprApp.post_display_hook`).
    """

    EVERY_S = 10.0
    NEVER = 1 << 30  # a generation-2 threshold Python never reaches

    def __init__(self) -> None:
        self._saved: tuple[int, ...] | None = None
        self._last = time.monotonic()
        self.count = 0  # full collections run (tests)

    def __enter__(self) -> "Collections":
        if enabled():
            self._saved = gc.get_threshold()
            gc.set_threshold(self._saved[0], self._saved[1], self.NEVER)
            self._last = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def due(self) -> bool:
        return self._saved is not None and time.monotonic() - self._last >= self.EVERY_S

    def collect(self) -> None:
        if self.due():
            gc.collect()
            self._last = time.monotonic()
            self.count += 1
