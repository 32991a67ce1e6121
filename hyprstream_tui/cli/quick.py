"""The warm `hyprstream infer`: the reply of the home's keep-alive engine when one of this version
already listens, over the plain messages of `engine/keepalive_wire.py`.

Its whole path imports the standard library's socket and pickle and `keepalive_wire`: no
dataclass module (hence `home_of`, `settings.Paths.from_env`'s home without its dataclass), no event class, no engine module (about 15 ms of the 30 the full client path
imported before it sent its request, a tenth of a warm reply). It prints what `run_infer` prints:
the text as it streams and a newline, or with --json one object with the timings; the engine's
errors come back as the same HyprError class (the same one line); Ctrl-C cancels the request in
the engine and ends with the same "Stopped" line.

Whatever it does not cover returns None before anything is printed, and `cmd_infer` takes the full
path (`engine/keepalive_client.py`), which starts, replaces or reports the engine: no engine
listening, one of another version, --no-keep-alive or HYPRSTREAM_KEEP_ALIVE=0, a prompt on stdin.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable

from hyprstream_tui.errors import Cancelled, HyprError

if TYPE_CHECKING:
    from pathlib import Path

    from hyprstream_tui.engine.keepalive_wire import Channel

REPLY_WAIT_S = 30.0  # for the engine to answer hello (it answers from the connection's own thread)
TICK_S = 0.1  # how often the wait for the next event looks at a Ctrl-C

Write = Callable[[str], Any]


def quick_infer(args: argparse.Namespace, write: Write | None = None) -> int | None:
    """Answer `args` (an `infer` command line) through a listening engine; None: not here."""
    from hyprstream_tui.engine.keepalive_wire import ENV, keep_alive_seconds

    if getattr(args, "no_keep_alive", False) or args.prompt == "-":
        return None
    keep_alive_s = keep_alive_seconds(os.environ.get(ENV))  # a malformed value: its one line
    if keep_alive_s is None:
        return None
    home = home_of(getattr(args, "home", None))
    channel = open_channel(home, keep_alive_s)
    if channel is None:
        return None
    try:
        answer(channel, args, write or stdout_write, home)
    finally:
        channel.close()
    return 0


def home_of(home: str | None) -> Path:
    """The home `settings.Paths.from_env(home)` names (tests/cli/test_quick_infer.py holds them
    equal), without importing `settings`, whose Paths is a dataclass."""
    from pathlib import Path

    raw = home if home is not None else os.environ.get("HYPRSTREAM_HOME") or "~/.cache/hyprstream"
    return Path(raw).expanduser().absolute()


def open_channel(home: Path, keep_alive_s: float) -> Channel | None:
    """A connection to `home`'s engine after hello and welcome; None unless one of this version
    listens and runs as this user (the full path words every other case)."""
    import socket

    from hyprstream_tui import __version__
    from hyprstream_tui.engine.keepalive_wire import PROTOCOL, Channel, same_user, socket_path

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path(home)))
        if not same_user(sock):
            raise OSError("another user's socket")
        channel = Channel(sock)
        channel.send(("hello", PROTOCOL, keep_alive_s))
        if not channel.poll(REPLY_WAIT_S):
            raise OSError("no welcome")
        welcome = channel.recv()
    except Exception:  # noqa: BLE001 - nothing listens, it is leaving, or another version replied
        sock.close()
        return None
    if not (isinstance(welcome, tuple) and welcome[:3] == ("welcome", PROTOCOL, __version__)) \
            or welcome[4:5] == (False,):  # still warming up: the full path decides (engine/light.py)
        sock.close()
        return None
    return channel


def answer(channel: Channel, args: argparse.Namespace, write: Write, home: Path) -> dict[str, Any]:
    """Send the request, print its reply as it streams; the engine's GenerationDone as a dict."""
    from hyprstream_tui.engine.keepalive_wire import absolute_spec, log_path, stopped

    rid = os.urandom(6).hex()
    params = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
              "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
              "max_tokens": args.max_tokens, "seed": args.seed, "stop": list(args.stop)}
    loading = {"dtype": args.dtype, "device": args.device, "quantize": args.quantize,
               "allow_pickle": args.allow_pickle, "threads": args.threads}
    channel.send(("infer", rid, {"spec": absolute_spec(args.model), "prompt": args.prompt,
                                 "system": args.system, "raw": args.raw, "params": params,
                                 "loading": loading}))
    log = log_path(home)
    load_s, shown, answered = 0.0, False, False
    interrupted: list[bool] = []
    previous = install_cancel(interrupted)
    try:
        cancelled = False
        while True:
            if interrupted and not cancelled:
                cancelled = True
                channel.send(("cancel", rid))
            try:
                if not channel.poll(TICK_S):
                    continue
                event = channel.recv()
            except (EOFError, OSError):
                raise HyprError(stopped(log)) from None
            if not isinstance(event, tuple) or len(event) < 3 or event[1] != rid:
                continue
            kind = event[0]
            if kind == "text" and not args.json:
                shown = True
                write(event[2])
            elif kind == "loaded":
                load_s = float(event[2])
            elif kind == "error":
                raise rebuilt(str(event[2]), str(event[3]), log)
            elif kind == "done":
                done: dict[str, Any] = event[2]
                answered = True
                break
    finally:
        signal_back(previous)
        if not args.json and (answered or shown or interrupted):
            write("\n")
    if interrupted:
        raise Cancelled("Stopped: the reply so far is shown above.")
    if args.json:
        import json

        data = {"model": args.model, **done}
        data["timings"]["load_s"] = round(load_s, 4)
        write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    return done


def rebuilt(kind: str, message: str, log: Path) -> HyprError:
    """The engine's error as the same HyprError class; a bug names the engine's log."""
    from hyprstream_tui import errors

    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, HyprError):
        return cls(message)
    return HyprError(f"{message} (the engine process's log: {log})")


def install_cancel(interrupted: list[bool]) -> Any:
    """While the reply streams, Ctrl-C only notes itself (the loop sends the cancel): a
    KeyboardInterrupt inside a read would leave half a message on the socket. Returns the handler
    to put back (None: not the main thread, nothing changed)."""
    try:
        return signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    except ValueError:
        return None


def signal_back(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


def stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


__all__ = ["home_of", "quick_infer"]
