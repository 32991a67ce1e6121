"""The keep-alive engine: one process per home that keeps models loaded between CLI commands (as
Ollama keeps a model loaded), so a second `hyprstream infer` answers without loading anything.

It runs an ordinary `Engine` on its own `Store` and answers clients (`engine.keepalive_client`) on a
Unix socket (`engine.keepalive_protocol`): each connection sends requests, and every event of a
request goes back as the engine's own frozen dataclass, GenerationDone or GenerationError last
(the warm `infer` of cli/quick.py speaks plain tuples instead: `engine.keepalive_wire`). The
engine's prefix cache (engine/prefix.py) lets a repeated chat template start skip its prefill.
A connection that closes cancels its requests. With no connection open and no request for the idle
timeout (HYPRSTREAM_KEEP_ALIVE, 5 minutes by default; each command's own value wins) it removes its
socket and exits. `hyprstream engine stop` ends it at once.

Started by the CLI on demand, detached: `python -m hyprstream_tui.engine.keepalive --home H
--keep-alive S`, its output in `<home>/logs/keepalive.log`. It holds `<home>/locks/keepalive.lock`
for its whole life, so a second one for the same home exits at once.

Also here: `start_infer`, what an `infer` request does (load, then the chat template or plain
text), used by this process and by `hyprstream infer --no-keep-alive` alike.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hyprstream_tui import __version__
from hyprstream_tui.engine.engine import Engine, Request
from hyprstream_tui.engine.events import (
    EventCallback,
    GenerationDone,
    GenerationError,
    ModelLoaded,
    TokenDelta,
)
from hyprstream_tui.engine.jobs import Job, error_event, new_request_id
from hyprstream_tui.engine.keepalive_protocol import (
    PROTOCOL,
    Cancel,
    Channel,
    Chat,
    EngineFiles,
    Hello,
    Infer,
    LoadedInfo,
    Loading,
    Status,
    StatusRequest,
    Stop,
    Stopping,
    Welcome,
    private_folder,
    same_user,
)
from hyprstream_tui.engine.loader import LoadOptions
from hyprstream_tui.engine.params import SamplingParams, check_prompt
from hyprstream_tui.engine.sources import parse_spec
from hyprstream_tui.errors import Conflict, HyprError, InvalidInput
from hyprstream_tui.store.locks import FileLock

if TYPE_CHECKING:
    from hyprstream_tui.settings import Paths

TICK_S = 0.2  # how often the accept loop looks at the idle timeout and a stop request


def start_infer(
    engine: Engine, spec: str, prompt: str, params: SamplingParams, *, system: str | None = None,
    raw: bool = False, options: LoadOptions | None = None, threads: int | None = None,
    on_event: EventCallback, request_id: str | None = None,
) -> Job:
    """Load the model of `spec` (a ModelLoaded event when it was not loaded yet), then answer
    `prompt` in a worker thread: as the user's message (after `system`) under the model's chat
    template, or continued as plain text when `raw` or when the model has no template."""
    rid = request_id or new_request_id()
    wanted = options or engine.options
    source = engine.resolve(spec)
    loaded = any(m.source.path == source.path and m.source.commit == source.commit
                 and m.options == wanted for m in engine.loaded())
    started = time.perf_counter()
    lm = engine.load(spec, wanted)
    if not loaded:
        on_event(ModelLoaded(request_id=rid, model=source.name, model_commit=source.commit,
                             seconds=max(time.perf_counter() - started, lm.load_s), dtype=lm.dtype,
                             device=lm.device, quantize=lm.options.quantize))
    if raw or not getattr(lm.tokenizer, "chat_template", None):
        if system:
            raise InvalidInput("--system needs a model with a chat template: drop it or --raw.")
        request = Request(spec=parse_spec(spec), params=params, prompt=check_prompt(prompt),
                          request_id=rid, options=options, threads=threads)
    else:
        from hyprstream_tui.engine.chat import check_messages

        turns = ([{"role": "system", "content": system}] if system else []) \
            + [{"role": "user", "content": prompt}]
        request = Request(spec=parse_spec(spec), params=params, request_id=rid, options=options,
                          threads=threads, messages=tuple(check_messages(turns)))
    return engine.submit(request, on_event)


def log(message: str) -> None:
    """One line in the log (this process's stderr is the log file)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}", file=sys.stderr, flush=True)


@dataclass(eq=False)
class Client:
    """One connection: its requests, and a lock so events of several requests interleave whole."""

    conn: Channel
    jobs: dict[str, Job] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)  # cancelled before their job existed
    closed: bool = False  # gone: a request still loading is cancelled as soon as it starts
    asked: bool = False  # it sent a request (the idle time counts from its end)
    plain: set[str] = field(default_factory=set)  # requests whose events go as plain tuples
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: object) -> None:
        with self.lock:
            rid = getattr(message, "request_id", None)
            wire = plain_event(message) if rid in self.plain else message
            try:
                if wire is not None:
                    self.conn.send(wire)
            except (OSError, ValueError):
                pass  # the client is gone: its read loop ends and cancels its requests
            if isinstance(message, (GenerationDone, GenerationError)):
                self.jobs.pop(message.request_id, None)
                self.plain.discard(message.request_id)

    def started(self, request_id: str, job: Job) -> None:
        with self.lock:
            self.jobs = {r: j for r, j in self.jobs.items() if not j.finished}
            self.jobs[request_id] = job
            cancel = self.closed or request_id in self.cancelled
        if cancel:
            job.cancel()

    def cancel(self, request_id: str | None = None) -> None:
        """Cancel one request (also before its job exists), or all of them (the client left)."""
        with self.lock:
            if request_id is None:
                self.closed = True
            else:
                self.cancelled.add(request_id)
            jobs = [j for r, j in self.jobs.items() if request_id in (None, r)]
        for job in jobs:
            job.cancel()


class KeepAliveServer:
    """The engine process: accept loop, one thread per connection, one per loading request."""

    def __init__(self, paths: Paths, keep_alive_s: float,
                 preload: tuple[str, Loading, list[int]] | None = None) -> None:
        from hyprstream_tui.store import Store

        self.files = EngineFiles.of(paths)
        self.life = FileLock(self.files.lock, "The engine process")
        self.keep_alive_s = keep_alive_s
        from hyprstream_tui.engine.cpu import usable_cores

        cores = usable_cores()
        # Every request sets its thread count (its own --threads, or all cores): a worker thread
        # must not keep an earlier command's.
        self.engine = Engine(store=Store(paths), threads=cores, drafts=True)
        self.started = time.time()
        # a model to load at once, and the tokens of the conversation to keep the KV cache of: the
        # command that started it answered without it (engine/light.py)
        self.preload = preload
        self.ready = threading.Event()  # warm-up done: Welcome says so (engine/light.py answers until then)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections = 0
        self._last_seen = time.monotonic()

    # ---- life -----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped or idle. The engine's lock is never released by hand: the kernel
        drops it when the process has exited, so a free lock means the process is gone."""
        try:
            self.life.acquire(wait=0)
        except Conflict:
            log("another engine process runs for this home: leaving")
            return 0
        for signum in (signal.SIGTERM, signal.SIGINT):  # `kill PID` stops it cleanly too
            signal.signal(signum, lambda *_: self.stopping.set())
        listener = self._listen()
        self.life.update(socket=str(self.files.socket), keep_alive_s=self.keep_alive_s)
        log(f"listening on {self.files.socket} (idle timeout {self.keep_alive_s:g} s)")
        threading.Thread(target=self._warm, name="hyprstream-warm", daemon=True).start()
        try:
            self._accept_loop(listener)
        finally:
            listener.close()
            self.files.socket.unlink(missing_ok=True)  # before the lock: a socket file left
            # with the lock free is what a killed engine leaves (the next command says so)
        self.engine.close(timeout=5)
        log("stopped")
        return 0

    def _warm(self) -> None:
        """Import what requests need, load the model it was started for, then say it is ready."""
        try:
            warm_imports()
            if self.preload is not None:
                spec, loading, ids = self.preload
                try:
                    from hyprstream_tui.engine.loader import set_threads

                    threads = loading.threads if loading.threads is not None else self.engine.threads
                    set_threads(threads)
                    options = LoadOptions(**loading.load_options())
                    if ids:
                        self.engine.warm(spec, options, ids, threads)
                    else:
                        self.engine.load(spec, options)
                    log(f"loaded {spec} ahead of its requests ({len(ids)} tokens of its last conversation run)")
                except Exception as exc:  # noqa: BLE001 - its first request reports it properly
                    log(f"could not load {spec} ahead: {type(exc).__name__}: {exc}")
        finally:
            self.ready.set()

    def _listen(self) -> socket.socket:
        """The socket file, 0600 from the start (umask), in a private folder; a file left by a
        killed engine is replaced (the lock says none is alive)."""
        private_folder(self.files.socket.parent)
        self.files.socket.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)
        try:
            sock.bind(str(self.files.socket))
        finally:
            os.umask(previous)
        os.chmod(self.files.socket, 0o600)
        sock.listen(16)
        return sock

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            ready, _, _ = select.select([listener], [], [], TICK_S)
            if ready:
                try:
                    sock, _ = listener.accept()
                except OSError:  # the client gave up in between
                    continue
                if not same_user(sock):  # 0600 already keeps others out; this says so in the log
                    log("refused a connection from another user")
                    sock.close()
                    continue
                sock.setblocking(True)
                with self._lock:
                    self._connections += 1
                threading.Thread(target=self._serve, args=(Channel(sock),),
                                 name="hyprstream-keepalive-conn", daemon=True).start()
            elif self._idle_for() >= self.keep_alive_s:
                log(f"idle for {self.keep_alive_s:g} s: leaving")
                return

    def _idle_for(self) -> float:
        with self._lock:
            return 0.0 if self._connections else time.monotonic() - self._last_seen

    def _touch(self) -> None:
        with self._lock:
            self._last_seen = time.monotonic()

    # ---- one connection -------------------------------------------------------------------
    def _serve(self, conn: Channel) -> None:
        client = Client(conn)
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                except Exception as exc:  # noqa: BLE001 - a message that does not unpickle
                    log(f"unreadable message: {type(exc).__name__}: {exc}")
                    break
                if isinstance(message, (Infer, Chat, Cancel)) or (
                        isinstance(message, tuple) and message[:1] in (("infer",), ("cancel",))):
                    client.asked = True  # a status or stop alone does not count as use
                    self._touch()
                if not self._handle(client, message):
                    break
        finally:
            client.cancel()
            conn.close()
            with self._lock:
                self._connections -= 1
                if client.asked:
                    self._last_seen = time.monotonic()

    def _handle(self, client: Client, message: object) -> bool:
        """Answer one message; False ends the connection."""
        if isinstance(message, tuple):
            return self._handle_plain(client, message)
        if isinstance(message, Hello):
            if message.keep_alive_s is not None:
                with self._lock:
                    self.keep_alive_s = message.keep_alive_s
            client.send(Welcome(protocol=PROTOCOL, version=__version__, pid=os.getpid(),
                                ready=self.ready.is_set()))
        elif isinstance(message, (Infer, Chat)):
            threading.Thread(target=self._request, args=(client, message), daemon=True,
                             name=f"hyprstream-keepalive-{message.request_id}").start()
        elif isinstance(message, Cancel):
            client.cancel(message.request_id)
        elif isinstance(message, StatusRequest):
            client.send(self.status())
        elif isinstance(message, Stop):
            log("asked to stop")
            client.send(Stopping(pid=os.getpid()))
            self.stopping.set()
        else:
            log(f"unknown message {type(message).__name__}: closing that connection")
            return False
        return True

    def _handle_plain(self, client: Client, message: tuple[object, ...]) -> bool:
        """The warm `infer`'s plain messages (engine/keepalive_wire.py); False ends the connection."""
        kind, args = message[0], message[1:]
        if kind == "hello" and len(args) == 2:
            if isinstance(args[1], (int, float)) and not isinstance(args[1], bool):
                with self._lock:
                    self.keep_alive_s = float(args[1])
            client.send(("welcome", PROTOCOL, __version__, os.getpid(), self.ready.is_set()))
        elif kind == "infer" and len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], dict):
            rid, fields = args[0], args[1]
            with client.lock:
                client.plain.add(rid)
            threading.Thread(target=self._plain_request, args=(client, rid, fields), daemon=True,
                             name=f"hyprstream-keepalive-{rid}").start()
        elif kind == "cancel" and len(args) == 1 and isinstance(args[0], str):
            client.cancel(args[0])
        else:
            log(f"unknown plain message {str(kind)[:40]!r}: closing that connection")
            return False
        return True

    def _plain_request(self, client: Client, rid: str, fields: dict[str, object]) -> None:
        """A plain `infer` as the Infer it stands for (the parameters checked here, as the CLI's
        full path checks them before sending)."""
        try:
            params, loading, system = fields["params"], fields["loading"], fields.get("system")
            if not isinstance(params, dict) or not isinstance(loading, dict):
                raise TypeError("params and loading must be dicts")
            message = Infer(request_id=rid, spec=str(fields["spec"]), prompt=str(fields["prompt"]),
                            params=SamplingParams(**{**params, "stop": tuple(params.get("stop") or ())}),
                            system=None if system is None else str(system),
                            raw=bool(fields.get("raw")), loading=Loading(**loading))
        except HyprError as exc:
            client.send(error_event(rid, exc))
            return
        except (KeyError, TypeError, ValueError) as exc:
            log(f"malformed plain infer {rid}: {type(exc).__name__}: {exc}")
            client.send(error_event(rid, InvalidInput("The engine process could not read that request: "
                                                      "run it again with --no-keep-alive.")))
            return
        self._request(client, message)

    def _request(self, client: Client, message: Infer | Chat) -> None:
        """Run one request in its own thread (loading a model can take seconds; the connection
        meanwhile reads cancels)."""
        rid = message.request_id
        log(f"{type(message).__name__.lower()} {rid} {message.spec}")
        try:
            options, threads = self._options(message.loading)
            if isinstance(message, Infer):
                job = start_infer(self.engine, message.spec, message.prompt, message.params,
                                  system=message.system, raw=message.raw, options=options,
                                  threads=threads, on_event=client.send, request_id=rid)
            else:
                from hyprstream_tui.engine.chat import check_messages

                request = Request(spec=parse_spec(message.spec), params=message.params,
                                  messages=tuple(check_messages(message.messages)),
                                  request_id=rid, options=options, threads=threads)
                job = self.engine.submit(request, client.send)
        except Exception as exc:  # noqa: BLE001 - reported to the client as the engine would
            if not isinstance(exc, HyprError):
                log(f"request {rid} failed:\n{traceback.format_exc()}")
            client.send(error_event(rid, exc))
            return
        client.started(rid, job)

    def _options(self, loading: Loading) -> tuple[LoadOptions, int | None]:
        return LoadOptions(**loading.load_options()), loading.threads

    def status(self) -> Status:
        with self._lock:
            connections = max(self._connections - 1, 0)  # the one asking aside
            idle = 0.0 if connections else time.monotonic() - self._last_seen
            keep_alive = self.keep_alive_s
        models = tuple(LoadedInfo(name=m.source.name, commit=m.source.commit, dtype=m.dtype,
                                  device=m.device, quantize=m.options.quantize)
                       for m in self.engine.loaded())
        return Status(pid=os.getpid(), version=__version__, home=str(self.files.home),
                      socket=str(self.files.socket), log=str(self.files.log), started=self.started,
                      keep_alive_s=keep_alive, idle_s=idle, connections=connections, models=models,
                      ready=self.ready.is_set())


def plain_event(event: object) -> tuple[object, ...] | None:
    """`event` as the warm `infer`'s plain tuple (engine/keepalive_wire.py); None for an event that
    is no part of its reply."""
    rid = getattr(event, "request_id", None)
    if isinstance(event, TokenDelta):
        return ("text", rid, event.text)
    if isinstance(event, ModelLoaded):
        return ("loaded", rid, event.seconds)
    if isinstance(event, GenerationDone):
        return ("done", rid, event.as_dict())
    if isinstance(event, GenerationError):
        return ("error", rid, event.kind, event.message)
    return None


def warm_imports() -> None:
    """Import what the first request needs while it is on its way, not after it: torch, the
    native decoder and tokenizer, and pygit2 (to resolve names). Not transformers: the native
    path never needs it, and importing it (about 2.6 s of CPU) would compete with the first
    request's own load; models the native classes do not cover import it themselves."""
    try:
        import torch  # noqa: F401

        from hyprstream_tui.engine import chat, generate  # noqa: F401
        from hyprstream_tui.engine.native import model, tokenizer  # noqa: F401
        from hyprstream_tui.store import gitrepo  # noqa: F401  (pygit2, for resolving names)
    except Exception as exc:  # noqa: BLE001 - the first request reports it properly
        log(f"warm-up import failed: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    from hyprstream_tui.settings import Paths

    parser = argparse.ArgumentParser(prog="python -m hyprstream_tui.engine.keepalive",
                                     description="The keep-alive engine of one home (started by the CLI).")
    parser.add_argument("--home", required=True)
    parser.add_argument("--keep-alive", type=float, required=True, help="idle timeout in seconds")
    parser.add_argument("--preload", help="a model to load at once (its spec)")
    parser.add_argument("--loading", default="{}", help="its load options (a Loading, as JSON)")
    parser.add_argument("--warm-ids", default="", help="token ids whose KV cache to keep (comma-separated)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        ids = [int(i) for i in args.warm_ids.split(",") if i.strip()]
        preload = None if not args.preload else (args.preload, Loading(**json.loads(args.loading)), ids)
        return KeepAliveServer(Paths.from_env(args.home), args.keep_alive, preload).run()
    except HyprError as exc:  # e.g. a socket folder that is not ours: one line in the log
        log(f"error: {exc.message}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
