"""Advisory locks on files with fcntl.flock.

The kernel drops a flock when its process dies, so a lock left by a SIGKILLed process is never
stale: the next writer simply gets it. The lock file keeps the holder's pid and a JSON status line
for `status` commands; that content is informational only.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hyprstream_tui.errors import Conflict, is_disk_full


class FileLock:
    """An exclusive, non-reentrant lock on `path`. Use `acquire(wait=...)` or as a context manager."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: float = 30.0) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = read_info(self.path).get("pid", "another process")
                    raise Conflict(f"{self.what} is busy (held by pid {holder}): wait for it to finish or stop it first.") from None
                time.sleep(0.02)
        self._fd = fd
        self.update(pid=os.getpid(), since=time.time())
        return self

    def update(self, **info: Any) -> None:
        """Rewrite the informational content (pid, heartbeat, progress) in place."""
        if self._fd is None:
            return
        current = read_info(self.path)
        current.update(info)
        data = json.dumps(current).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as exc:
            # Informational only: on a full disk the lock still holds, and the write it guards
            # reports the full disk with what it was writing.
            if not is_disk_full(exc):
                raise

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """True when some live process holds the lock on `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def read_info(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def locked(path: Path, what: str, *, wait: float = 30.0) -> Iterator[FileLock]:
    lock = FileLock(path, what).acquire(wait=wait)
    try:
        yield lock
    finally:
        lock.release()
