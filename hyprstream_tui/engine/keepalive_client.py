"""The CLI's side of the keep-alive engine (`engine.keepalive`): connect to the home's engine
process, starting it when none listens, and run requests there as `Job`s.

`connect` is what `hyprstream infer` and `chat` call: it connects to the home's socket; when
nothing listens it takes `<home>/locks/keepalive-start.lock` (two racing commands start one
engine), starts `python -m hyprstream_tui.engine.keepalive` detached in a new session, and waits
until it accepts. A socket file left behind with no engine holding the engine's lock means the
last one was killed or crashed: the new one replaces it, and `note` says so in one line.

`KeepAliveClient.infer` / `chat` return Jobs whose events are the engine's own dataclasses;
GenerationDone or GenerationError ends a job (the error rebuilt as the same HyprError class), and
cancelling a job (Ctrl-C) cancels the request in the engine. An engine that dies mid-reply fails
its jobs with one line that names its log.

Never imports torch, transformers or pygit2: the warm path of the CLI stays light.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from hyprstream_tui import __version__
from hyprstream_tui.engine.events import EventCallback, GenerationDone, GenerationError
from hyprstream_tui.engine.jobs import Forwarded, Job, ignore, new_request_id
from hyprstream_tui.engine.keepalive_protocol import (
    PROTOCOL,
    Cancel,
    Channel,
    Chat,
    EngineFiles,
    Hello,
    Infer,
    Loading,
    Status,
    StatusRequest,
    Stop,
    Stopping,
    Welcome,
    same_user,
)
from hyprstream_tui.engine.keepalive_wire import absolute_spec, stopped
from hyprstream_tui.errors import HyprError

if TYPE_CHECKING:
    import subprocess

    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.settings import Paths

RESTARTED = "note: the engine process had stopped; started a new one."
START_WAIT_S = 60.0  # for a new engine process to accept (it listens before importing torch)
REPLY_WAIT_S = 30.0  # for an engine to answer Hello, a status or a stop
STOP_WAIT_S = 20.0  # for a stopped engine to cancel its requests and exit
POLL_S = 0.02
LOG_ROTATE_BYTES = 10 << 20
SPIN_COUNT = 30000  # GOMP_SPINCOUNT of the engine process: see `spawn`

Note = Callable[[str], object]  # where the one-line note about a replaced engine goes


class KeepAliveClient:
    """One connection to the keep-alive engine. `infer` and `chat` (the `ChatEngine` protocol)
    send each request with this command's load options and threads (`loading`)."""

    def __init__(self, conn: Channel, files: EngineFiles, welcome: Welcome,
                 loading: Loading = Loading()) -> None:
        self.files = files
        self.pid = welcome.pid
        self.loading = loading
        self._conn = conn
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._jobs: dict[str, Forwarded] = {}
        self._gone: str | None = None
        self._reader: threading.Thread | None = None

    # ---- requests ---------------------------------------------------------------------------
    def infer(self, spec: str, prompt: str, params: SamplingParams, *, system: str | None = None,
              raw: bool = False, on_event: EventCallback | None = None,
              request_id: str | None = None) -> Job:
        """Answer one prompt; the engine picks the chat template or plain text (as `infer`)."""
        rid = request_id or new_request_id()
        return self._submit(Infer(request_id=rid, spec=absolute_spec(spec), prompt=prompt,
                                  params=params, system=system, raw=raw, loading=self.loading),
                            on_event)

    def chat(self, spec: str, messages: Sequence[Mapping[str, str]], params: SamplingParams, *,
             on_event: EventCallback | None = None, request_id: str | None = None) -> Job:
        rid = request_id or new_request_id()
        return self._submit(Chat(request_id=rid, spec=absolute_spec(spec),
                                 messages=tuple(dict(m) for m in messages), params=params,
                                 loading=self.loading), on_event)

    def ask(self, message: StatusRequest | Stop) -> object:
        """One message and its one reply (before any request: the reader is not running)."""
        self._send(message)
        try:
            if not self._conn.poll(REPLY_WAIT_S):
                raise HyprError(f"The engine process (pid {self.pid}) does not answer: see {self.files.log}.")
            return self._conn.recv()
        except (EOFError, OSError):
            raise HyprError(self._stopped()) from None

    def close(self) -> None:
        """Hang up: the engine cancels what this connection still runs."""
        self._conn.shutdown()  # wakes the reader blocked in recv
        self._conn.close()

    def _submit(self, message: Infer | Chat, on_event: EventCallback | None) -> Job:
        rid = message.request_id
        job = Job(rid, on_cancel=lambda: self._cancel(rid))
        with self._lock:
            if self._gone is not None:
                raise HyprError(self._gone)
            self._jobs[rid] = Forwarded(job, on_event or ignore)
            if self._reader is None:
                self._reader = threading.Thread(target=self._read, name="hyprstream-keepalive-events",
                                                daemon=True)
                self._reader.start()
        try:
            self._send(message)
        except HyprError:
            with self._lock:
                self._jobs.pop(rid, None)
            raise
        return job

    def _cancel(self, request_id: str) -> None:
        try:
            self._send(Cancel(request_id=request_id))
        except HyprError:
            pass  # the engine is gone: the job fails on its own

    def _send(self, message: object) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                raise HyprError(self._stopped()) from None

    def _stopped(self) -> str:
        return stopped(self.files.log)

    def _read(self) -> None:
        """Hand each event to its job's callback; a final one ends the job."""
        while True:
            try:
                event = self._conn.recv()
            except Exception:  # noqa: BLE001 - closed, reset, or nothing this version reads
                break
            rid = getattr(event, "request_id", None)
            final = isinstance(event, (GenerationDone, GenerationError))
            with self._lock:
                pending = self._jobs.get(rid) if isinstance(rid, str) else None
                if pending is not None and final:
                    del self._jobs[pending.job.request_id]
            if pending is not None:
                pending.deliver(event, self._rebuild)
        message = self._stopped()
        with self._lock:
            self._gone = message
            left, self._jobs = list(self._jobs.values()), {}
        for pending in left:
            pending.fail(message)

    def _rebuild(self, event: GenerationError) -> BaseException:
        """The engine's error as the same HyprError class; a bug names the engine's log."""
        from hyprstream_tui.engine.forkserver import rebuild_error

        return rebuild_error(event.kind, event.message) \
            or HyprError(f"{event.message} (the engine process's log: {self.files.log})")


# ---- connecting, starting ---------------------------------------------------------------------
def connect(paths: Paths, *, keep_alive_s: float, loading: Loading = Loading(),
            note: Note | None = None) -> KeepAliveClient:
    """A connection to the home's engine process, started if none runs."""
    files = EngineFiles.of(paths)
    client = open_client(files, keep_alive_s, loading)
    if client is not None:
        return client
    from hyprstream_tui.store.locks import locked

    with locked(files.start_lock, "Starting the engine process", wait=START_WAIT_S * 2):
        client = open_client(files, keep_alive_s, loading)  # a racing command started it
        return client if client is not None else start(files, keep_alive_s, loading, note)


def attach(paths: Paths) -> KeepAliveClient | None:
    """A connection to the home's engine process if one runs (none is started)."""
    return open_client(EngineFiles.of(paths), None, Loading(), replace_other=False)


def open_client(files: EngineFiles, keep_alive_s: float | None, loading: Loading, *,
                replace_other: bool = True) -> KeepAliveClient | None:
    """Connect and say Hello; None when nothing (or an engine that is leaving) listens. An engine
    of another version is stopped (`replace_other`) and None returned: the caller starts ours."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(files.socket))
    except OSError:  # no file, or a file nobody listens on
        sock.close()
        return None
    if not same_user(sock):
        sock.close()
        raise HyprError(f"The engine socket {files.socket} belongs to another user: remove it, or add "
                        "--no-keep-alive.")
    conn = Channel(sock)
    try:
        conn.send(Hello(protocol=PROTOCOL, keep_alive_s=keep_alive_s))
        if not conn.poll(REPLY_WAIT_S):
            conn.close()
            raise HyprError(f"The engine process does not answer: see {files.log}, stop it with "
                            "`hyprstream engine stop`, or add --no-keep-alive.")
        welcome = conn.recv()
    except (EOFError, OSError):  # it was leaving (idle timeout) as we came
        conn.close()
        return None
    client = KeepAliveClient(conn, files, welcome if isinstance(welcome, Welcome) else
                             Welcome(protocol=-1, version="?", pid=-1), loading)
    ours = isinstance(welcome, Welcome) and welcome.protocol == PROTOCOL and welcome.version == __version__
    if ours or not replace_other:
        return client
    stop_client(client)
    return None


def start(files: EngineFiles, keep_alive_s: float, loading: Loading,
          note: Note | None) -> KeepAliveClient:
    """Start the engine process (the start lock held) and connect to it."""
    from hyprstream_tui.store.locks import is_locked, read_info

    deadline = time.monotonic() + START_WAIT_S
    while is_locked(files.lock):  # one is starting or leaving: wait for either
        client = open_client(files, keep_alive_s, loading)
        if client is not None:
            return client
        if time.monotonic() > deadline:
            pid = read_info(files.lock).get("pid", "?")
            raise HyprError(f"The engine process (pid {pid}) does not accept connections: see {files.log}, "
                            f"or stop it (`kill {pid}`).")
        time.sleep(POLL_S)
    crashed = files.socket.exists()  # an engine that exits removes its socket
    proc = spawn(files, keep_alive_s)
    deadline = time.monotonic() + START_WAIT_S
    while True:
        client = open_client(files, keep_alive_s, loading)
        if client is not None:
            break
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            why = f"exit code {code}" if code is not None else f"no answer in {START_WAIT_S:g} s"
            raise HyprError(f"The engine process did not start ({why}): see {files.log}, or add "
                            "--no-keep-alive.")
        time.sleep(POLL_S)
    if crashed and note is not None:
        note(RESTARTED)
    return client


def start_behind(paths: Paths, keep_alive_s: float, spec: str, loading: Loading,
                 ids: Sequence[int] = (), note: Note | None = None) -> bool:
    """Start the home's engine process to load `spec` at once and keep the KV cache of the tokens
    `ids` (the conversation so far), without waiting for it (a command that answered without it:
    the next one finds it warm); False where one runs or starts already. One that had crashed is
    replaced with the `note` line, as `connect` does."""
    from hyprstream_tui.errors import Conflict
    from hyprstream_tui.store.locks import is_locked, locked

    files = EngineFiles.of(paths)
    try:
        with locked(files.start_lock, "Starting the engine process", wait=0):
            if is_locked(files.lock):
                return False
            crashed = files.socket.exists()  # an engine that exits removes its socket
            spawn(files, keep_alive_s, preload=(absolute_spec(spec), loading, list(ids)))
            if crashed and note is not None:
                note(RESTARTED)
            return True
    except Conflict:  # another command is starting it
        return False


def spawn(files: EngineFiles, keep_alive_s: float,
          preload: tuple[str, Loading, list[int]] | None = None) -> subprocess.Popen[bytes]:
    """`python -m hyprstream_tui.engine.keepalive`, detached: its own session (a Ctrl-C in this
    terminal is not its), output to the log, run from the folder this package is imported from;
    `preload`: a model (spec, load options) it loads at once, and tokens it runs to keep their cache."""
    import subprocess

    files.log.parent.mkdir(parents=True, exist_ok=True)
    if files.log.exists() and files.log.stat().st_size > LOG_ROTATE_BYTES:
        os.replace(files.log, files.log.with_name(files.log.name + ".1"))
    package_parent = Path(__file__).resolve().parents[2]
    # OpenMP threads that wait at a barrier sleep instead of spinning. The engine runs each load
    # and each request in a thread of its own; with spinning waits, the OpenMP threads of an
    # earlier request's thread fought the next one's for the cores: on 2 cores a warm SmolLM2
    # decoded at 1-5 tokens/s instead of 10 (measured). A short spin first (GOMP_SPINCOUNT, some
    # tens of microseconds) keeps a step's many barriers off the sleep path: the exact bf16 step
    # opens 31 regions a token and torch's attention 30 more, and sleeping between them cost it
    # about 2.8 ms a token; an idle team stops spinning as soon. Read when torch loads OpenMP.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", str(SPIN_COUNT))}
    with open(files.log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "hyprstream_tui.engine.keepalive", "--home", str(files.home),
             "--keep-alive", repr(keep_alive_s), *_preload_args(preload)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True, cwd=package_parent, env=env,
        )


def _preload_args(preload: tuple[str, Loading, list[int]] | None) -> list[str]:
    if preload is None:
        return []
    import dataclasses
    import json

    spec, loading, ids = preload
    return ["--preload", spec, "--loading", json.dumps(dataclasses.asdict(loading)),
            "--warm-ids", ",".join(str(i) for i in ids)]


# ---- status, stop ----------------------------------------------------------------------------
def status(paths: Paths) -> Status | None:
    """The running engine's status; None when none runs for this home."""
    client = attach(paths)
    if client is None:
        return None
    try:
        reply = client.ask(StatusRequest())
    finally:
        client.close()
    if not isinstance(reply, Status):
        raise HyprError("The engine process speaks another version: stop it with `hyprstream engine stop`.")
    return reply


def stop(paths: Paths) -> int | None:
    """Stop the home's engine process and wait until it is gone; its pid (None: none ran)."""
    from hyprstream_tui.store.locks import is_locked, read_info

    files = EngineFiles.of(paths)
    client = attach(paths)
    if client is not None:
        return stop_client(client)
    if not is_locked(files.lock):
        return None
    pid = read_info(files.lock).get("pid")  # alive but not listening: signal it
    if isinstance(pid, int):
        end_process(files, pid)
    return pid if isinstance(pid, int) else None


def stop_client(client: KeepAliveClient) -> int:
    try:
        reply = client.ask(Stop())
    finally:
        client.close()
    pid = reply.pid if isinstance(reply, Stopping) else client.pid
    end_process(client.files, pid, asked=isinstance(reply, Stopping))
    return pid


def end_process(files: EngineFiles, pid: int, *, asked: bool = False) -> None:
    """Wait for the engine to leave (SIGTERM first unless `asked`; SIGKILL when it lingers)."""
    import signal

    from hyprstream_tui.store.locks import is_locked

    if not asked and pid > 0:
        signal_quietly(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while is_locked(files.lock) and time.monotonic() < deadline:
        time.sleep(POLL_S * 2)
    if is_locked(files.lock) and pid > 0:
        signal_quietly(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_WAIT_S
        while is_locked(files.lock) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        files.socket.unlink(missing_ok=True)


def signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["KeepAliveClient", "RESTARTED", "absolute_spec", "attach", "connect", "status", "stop"]
