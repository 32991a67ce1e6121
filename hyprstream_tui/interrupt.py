"""Ctrl-C before a command has begun its work: one line and out, not a KeyboardInterrupt traceback.

`python -m hyprstream_tui` installs `exit_at_once` before it imports the CLI, and `cli.main` keeps it
while it builds its parser (about half a second of imports); nothing is written in that time, so
leaving at once with `os._exit` is safe. The command itself runs with Python's usual handler, whose
KeyboardInterrupt `cli.main` turns into one line after the command's own clean-up has run.

Two ways Python loses that KeyboardInterrupt, both met by the Ctrl-C tests: raised inside a
`__del__` or a weakref callback, it is printed as "Exception ignored" and dropped (the command ran
on); raised inside a library's lazy import, it came back wrapped in another exception (a RuntimeError
from `__set_name__`), or lost altogether (an ImportError "PyCapsule_Import could not import module
_socket" when it landed in a C extension's import). `redelivered()` sends the first kind again and
notes every Ctrl-C it sees; `caused_by_interrupt` takes any exception raised after one for the
Ctrl-C's doing.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator

MESSAGE = b"error: interrupted before the command started; nothing was changed.\n"


def exit_at_once(_signum: int, _frame: Any) -> None:
    os.write(2, MESSAGE)
    os._exit(130)


def during_start_up() -> Any:
    """Install `exit_at_once`; returns what to give back to `restore` (None: nothing was changed)."""
    try:
        return signal.signal(signal.SIGINT, exit_at_once)  # the handler it replaced
    except ValueError:  # not the main thread, the only one that may set a handler: nothing changed
        return None


def restore(previous: Any) -> None:
    """The handler from before `during_start_up`; Python's own if that was `exit_at_once` too."""
    if previous is None:
        return
    if previous is exit_at_once or not (callable(previous) or previous in (signal.SIG_IGN, signal.SIG_DFL)):
        previous = signal.default_int_handler
    signal.signal(signal.SIGINT, previous)


class _Noted:
    """Whether a Ctrl-C came while a command ran: set by `_noting`, which runs in the main thread
    (a flag rather than a threading.Event, so that `hyprstream --help` imports no threading)."""

    interrupt = False


def _noting(signum: int, frame: Any) -> None:
    _Noted.interrupt = True
    signal.default_int_handler(signum, frame)


def _unraisable(args: Any) -> None:
    import threading

    if args.exc_type is not None and issubclass(args.exc_type, KeyboardInterrupt):
        # Python dropped it (in a __del__ or callback): deliver it again, once this hook has returned
        timer = threading.Timer(0.01, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
        return
    sys.__unraisablehook__(args)


@contextmanager
def redelivered() -> Iterator[None]:
    """While a command runs: a Ctrl-C that lands where Python would drop it is delivered again."""
    import threading

    previous = sys.unraisablehook
    sys.unraisablehook = _unraisable
    handler = None
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handler = signal.signal(signal.SIGINT, _noting)
    try:
        yield
    finally:
        sys.unraisablehook = previous
        if handler is not None and signal.getsignal(signal.SIGINT) is _noting:
            signal.signal(signal.SIGINT, handler)


def caused_by_interrupt(exc: BaseException) -> bool:
    """`exc` or what caused it is a KeyboardInterrupt (a library wrapped a Ctrl-C in its own error),
    or it came after a Ctrl-C (the interrupt was lost inside it, e.g. in a C extension's import)."""
    if _Noted.interrupt:
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False

