"""The one forkserver behind the TUI's child processes (the engine, `engine.child`, and each
training run, `engine.train.process`).

multiprocessing's forkserver imports torch, transformers, PEFT, the engine and the training loop
once (`warm_child`, at a lower priority), so every child forks ready to load its model and
inherits that priority. The helpers here are what both kinds of child share: starting it, sending
a child's output to a log file, and turning an error sent back by name into its HyprError class.

Never imports torch here: only the forkserver and its children do.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from multiprocessing.context import ForkServerContext
from pathlib import Path

from hyprstream_tui import errors
from hyprstream_tui.errors import HyprError

PRELOAD = ["hyprstream_tui.engine.warm_child"]
SETTINGS_PREFIX = "HYPRSTREAM_"
_lock = threading.Lock()
_context: ForkServerContext | None = None


def context() -> ForkServerContext:
    """The forkserver context, started if it is not running (its preload set once per process)."""
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        ctx = _context
    _ensure_running()
    return ctx


def warm() -> None:
    """Start the forkserver now (it imports torch and the rest in its own process)."""
    context()


def _ensure_running() -> None:
    """Start the forkserver (and multiprocessing's resource tracker) unless running.

    Both hand their child `sys.stderr.fileno()`; inside a Textual app `sys.stderr` is the app's
    print capture, whose descriptor is not a real one, so the real stderr stands in for the call."""
    from multiprocessing import forkserver

    with _lock:
        saved = sys.stderr
        if sys.__stderr__ is not None:
            sys.stderr = sys.__stderr__
        try:
            forkserver.ensure_running()
        finally:
            sys.stderr = saved


def settings() -> dict[str, str]:
    """This process's `HYPRSTREAM_*` environment, for a child to take with `take_settings`."""
    return {k: v for k, v in os.environ.items() if k.startswith(SETTINGS_PREFIX)}


def take_settings(values: dict[str, str]) -> None:
    """In a child: its parent's `HYPRSTREAM_*` environment in place of the forkserver's.

    A child's environment is the forkserver's, as it was when the forkserver started; a setting
    the parent changed since (a switch such as `HYPRSTREAM_FUSED_STEP`) would not reach it."""
    for key in [k for k in os.environ if k.startswith(SETTINGS_PREFIX) and k not in values]:
        del os.environ[key]
    os.environ.update(values)


def log_to(path: Path) -> None:
    """Send this process's stdout and stderr (Python's and C's) to `path`: on the app's terminal,
    a library's warning would be drawn over the UI."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def rebuild_error(name: str, message: str) -> HyprError | None:
    """The HyprError subclass called `name` with `message` (None for any other name)."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, HyprError):
        return cls(message)
    return None
