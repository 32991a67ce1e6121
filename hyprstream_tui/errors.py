"""Every failure a user can cause is a HyprError with one sentence that says what to do.

Tracebacks are for bugs; the CLI prints `error: <message>` for these and exits with `exit_code`.

A message about a setting (a training option, a load option, a name to choose) names the setting,
never a front end's way to give it: `learning_rate`, in backticks, as a plain lowercase name.
`settings` lists those names, and `worded` lets each front end say them its own way: the CLI as
its flag (`--learning-rate`), the TUI as its field's label (`Learning rate`). Commands, also
written in backticks, always hold a space (`hyprstream lora list`), so they never count as one.
"""

from __future__ import annotations

import errno
import re
from typing import Callable

SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")  # a setting named in a message


class HyprError(Exception):
    """A user-facing failure. The message is one line and says what to do next."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would read like a traceback.
        super().__init__(" ".join(str(message).split()))
        # Read from the message, so an error rebuilt from its class name and message in another
        # process (engine/forkserver.py) names the same settings.
        self.settings: tuple[str, ...] = tuple(dict.fromkeys(SETTING.findall(self.message)))

    @property
    def message(self) -> str:
        return str(self.args[0])

    @property
    def setting(self) -> str | None:
        """The setting to change, the first one the message names (None: it names none)."""
        return self.settings[0] if self.settings else None

    def worded(self, name: Callable[[str], str]) -> str:
        """The message with each setting it names written as `name(setting)`."""
        return worded(self.message, name)


def worded(message: str, name: Callable[[str], str]) -> str:
    """`message` (a HyprError's, or an event's that carries one) with each setting it names
    written as `name(setting)`."""
    return SETTING.sub(lambda m: name(m.group(1)), message)


class InvalidInput(HyprError):
    """A name, parameter or file the user gave is not acceptable."""

    exit_code = 2


class NotFound(HyprError):
    """A model, adapter, tag, commit or file that does not exist."""

    exit_code = 3


class Conflict(HyprError):
    """The thing exists already, or another process holds it (lock)."""

    exit_code = 4


class UnsafeContent(HyprError):
    """Content that would run code (pickle, remote code) and was not explicitly allowed."""

    exit_code = 5


class StorageError(HyprError):
    """Disk full, permission denied, corrupt object: the previous state is intact."""

    exit_code = 6


class HubError(HyprError):
    """The model hub could not be reached or refused the request."""

    exit_code = 7


class Cancelled(HyprError):
    """The user stopped a long operation; what was complete is kept."""

    exit_code = 130


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How a full disk or a file-size limit reads when a library (libgit2, safetensors' Rust writer)
# reports it as text instead of an OSError with its errno.
_DISK_FULL_TEXT = ("no space left on device", "file too large", "disk quota exceeded",
                   "os error 28", "os error 27", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """True for a write that failed because the disk (or quota, or file-size limit) is full."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return any(needle in text for needle in _DISK_FULL_TEXT)


def disk_full(what: str) -> StorageError:
    return StorageError(f"Not enough disk space while {what}: free some space and try again (nothing was changed).")
