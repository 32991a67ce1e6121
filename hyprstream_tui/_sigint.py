"""Ctrl-C before a command has begun its work: one line and out, not a KeyboardInterrupt traceback.

`python -m hyprstream_tui` installs `exit_at_once` before it imports the CLI, and `cli.main` keeps it
while it builds its parser (about half a second of imports); nothing is written in that time, so
leaving at once with `os._exit` is safe. The command itself runs with Python's usual handler, whose
KeyboardInterrupt `cli.main` turns into one line after the command's own clean-up has run.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

MESSAGE = b"error: interrupted before the command started; nothing was changed.\n"


def exit_at_once(_signum: int, _frame: Any) -> None:
    os.write(2, MESSAGE)
    os._exit(130)


def during_start_up() -> Any:
    """Install `exit_at_once`; returns what to give back to `restore` (None: nothing was changed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, exit_at_once)
    return previous


def restore(previous: Any) -> None:
    """The handler from before `during_start_up`; Python's own if that was `exit_at_once` too."""
    if previous is None:
        return
    if previous is exit_at_once or not (callable(previous) or previous in (signal.SIG_IGN, signal.SIG_DFL)):
        previous = signal.default_int_handler
    signal.signal(signal.SIGINT, previous)
