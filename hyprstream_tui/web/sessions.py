"""One browser tab, one app process: textual-serve's `AppService`, started in a process group of
its own so that closing the tab ends the app and everything it started (the forkserver, the
engine child, a training run), and a cap on how many run at once.

textual-serve starts the app through a shell and, on close, only asks it to quit and waits. Here
the app is exec'd directly in a new session (its pid is its process group), asked to quit, given
`QUIT_GRACE_S` (a training run finishes its step and commits), and then its whole group is sent
SIGTERM and, if anything is left, SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
from asyncio.subprocess import PIPE, Process
from typing import Any, Iterable, Sequence

from textual_serve.app_service import AppService

QUIT_GRACE_S = 20.0  # the app's own shutdown: a running training step finishes and commits
TERM_GRACE_S = 3.0  # after SIGTERM to the group, before SIGKILL


class AppSession(AppService):
    """The app process behind one websocket (textual-serve's AppService, exec'd in its own group)."""

    def __init__(self, argv: Sequence[str], *, hide_env: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(shlex.join(argv), **kwargs)
        self.argv = list(argv)
        self.hide_env = frozenset(hide_env)

    async def _open_app_process(self, width: int = 80, height: int = 24) -> Process:
        environment = self._build_environment(width=width, height=height)
        for name in self.hide_env:  # the web view's token is none of the app's business
            environment.pop(name, None)
        self._process = process = await asyncio.create_subprocess_exec(
            *self.argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, env=environment, start_new_session=True)
        assert process.stdin is not None
        self._stdin = process.stdin
        return process

    async def stop(self) -> None:
        """Ask the app to quit, then end its whole process group, whatever the app did."""
        process = self._process
        try:
            await asyncio.wait_for(super().stop(), QUIT_GRACE_S)
        except (TimeoutError, ConnectionError):
            pass
        if process is not None:
            await end_group(process)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pgid was reused by someone else's processes: ours are gone
        return False
    return True


async def end_group(process: Process, *, term_grace: float = TERM_GRACE_S) -> None:
    """End the process group that `process` leads (new session: its pgid is its pid), and reap it.

    SIGTERM first (the app exits as if quit, its children with it), then SIGKILL for what is left."""
    pgid = process.pid
    if _signal_group(pgid, signal.SIGTERM):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + term_grace
        while loop.time() < deadline and _signal_group(pgid, 0):
            if process.returncode is None:
                try:
                    await asyncio.wait_for(process.wait(), 0.05)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(0.05)
        _signal_group(pgid, signal.SIGKILL)  # zombies (reparented, unreaped) take this harmlessly
    if process.returncode is None:
        await process.wait()


class SessionLimit:
    """The app sessions running now, at most `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active: set[AppSession] = set()

    @property
    def full(self) -> bool:
        return len(self.active) >= self.limit

    def add(self, session: AppSession) -> None:
        self.active.add(session)

    def discard(self, session: AppSession) -> None:
        self.active.discard(session)

    async def stop_all(self) -> None:
        await asyncio.gather(*(s.stop() for s in list(self.active)), return_exceptions=True)
