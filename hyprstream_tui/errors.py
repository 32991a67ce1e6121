"""Every failure a user can cause is a HyprError with one sentence that says what to do.

Tracebacks are for bugs; the CLI prints `error: <message>` for these and exits with `exit_code`.
"""

from __future__ import annotations


class HyprError(Exception):
    """A user-facing failure. The message is one line and says what to do next."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would read like a traceback.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


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
