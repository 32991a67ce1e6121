"""The engine in a child process, for the TUI: the same `chat` and jobs as `Engine`, over a pipe.

With generation in the UI's process, its Python thread (between torch's kernels) holds the
interpreter lock, and when the OS has that nice'd thread off a core the event loop waits for it:
keys took up to tens of milliseconds to be drawn. In a child process the UI's interpreter is the
event loop's alone, and the UI process never imports torch at all.

The child forks from the forkserver of `engine.forkserver` (torch and transformers loaded, lower
priority) and runs an ordinary `Engine` on its own `Store`. Requests go down the pipe;
every event comes back as the engine's own frozen dataclass, and GenerationDone or
GenerationError completes the parent's job (the error as the same HyprError class). A parent that
goes away closes the pipe, and the child cancels its requests and exits.

Never imports torch here.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING, Mapping, Sequence

from hyprstream_tui.engine.events import EventCallback, GenerationDone, GenerationError
from hyprstream_tui.engine.forkserver import context, log_to, rebuild_error, settings, take_settings
from hyprstream_tui.engine.jobs import Forwarded, Job, error_event, ignore
from hyprstream_tui.errors import HyprError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.settings import Paths

_ids = itertools.count(1)


class ChildEngine:
    """An `Engine` running in a child process; `chat`, `unload` and `close` as the Engine's."""

    def __init__(self, paths: "Paths") -> None:
        ctx = context()
        self._conn, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(theirs, paths, settings()), name="hyprstream-engine",
                                 daemon=True)
        self._proc.start()
        theirs.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._jobs: dict[str, Forwarded] = {}
        self._gone: str | None = None
        threading.Thread(target=self._read, name="hyprstream-engine-events", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:
                raise HyprError("The engine process has stopped: restart hyprstream.") from exc

    def chat(self, spec: str, messages: Sequence[Mapping[str, str]], params: "SamplingParams", *,
             on_event: EventCallback | None = None, request_id: str | None = None) -> Job:
        rid = request_id or f"child-{next(_ids)}"
        job = Job(rid, on_cancel=lambda: self._cancel(rid))
        with self._lock:
            if self._gone is not None:
                raise HyprError(self._gone)
            self._jobs[rid] = Forwarded(job, on_event or ignore)
        self._send(("chat", rid, spec, [dict(m) for m in messages], params))
        return job

    def _cancel(self, request_id: str) -> None:
        """The job's cancel goes down the pipe."""
        try:
            self._send(("cancel", request_id))
        except HyprError:
            pass  # the process is gone: the job fails on its own

    def unload(self, name: str | None = None) -> None:
        self._send(("unload", name))

    def close(self, timeout: float | None = 10.0) -> None:
        try:
            self._send(("close",))
        except HyprError:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def _read(self) -> None:
        while True:
            try:
                event = self._conn.recv()
            except (EOFError, OSError):
                break
            request_id = getattr(event, "request_id", None)
            final = isinstance(event, (GenerationDone, GenerationError))
            with self._lock:
                request = self._jobs.get(request_id) if isinstance(request_id, str) else None
                if request is not None and final:
                    del self._jobs[request.job.request_id]
            if request is None:
                continue
            request.deliver(event, _rebuild)
        message = "The engine process stopped (see $HYPRSTREAM_HOME/logs/engine.log): restart hyprstream."
        with self._lock:
            self._gone = message
            pending, self._jobs = list(self._jobs.values()), {}
        for request in pending:
            request.fail(message)


def _rebuild(event: GenerationError) -> BaseException:
    """The engine's error as the same HyprError class; a bug as its own one-line report."""
    return rebuild_error(event.kind, event.message) or RuntimeError(event.message)


def _serve(conn: "Connection", paths: "Paths", env: dict[str, str]) -> None:
    """The child: an Engine answering requests from `conn` until it closes (with the parent's
    `HYPRSTREAM_*` settings)."""
    take_settings(env)
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.store import Store

    log_to(paths.home / "logs" / "engine.log")
    engine = Engine(store=Store(paths))
    send_lock = threading.Lock()
    jobs: dict[str, Job] = {}

    def send(event: object) -> None:
        with send_lock:
            try:
                conn.send(event)
            except (OSError, ValueError):
                pass  # the parent is gone: the read loop below ends and cancels everything
        if isinstance(event, (GenerationDone, GenerationError)):
            jobs.pop(event.request_id, None)

    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "chat":
                _, rid, spec, messages, params = message
                try:
                    jobs[rid] = engine.chat(spec, messages, params, on_event=send, request_id=rid)
                except HyprError as exc:
                    send(error_event(rid, exc))
            elif kind == "cancel":
                job = jobs.get(message[1])
                if job is not None:
                    job.cancel()
            elif kind == "unload":
                engine.unload(message[1])
            elif kind == "close":
                break
    finally:
        engine.close()
