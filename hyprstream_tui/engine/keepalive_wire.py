"""The light half of the keep-alive protocol: where the engine's socket is, whether keep-alive is
on, the framing of messages, the same-user check, and the plain messages of the CLI's warm path.

`hyprstream infer` with an engine already listening (`cli/quick.py`) speaks plain tuples and dicts
(no dataclass to import on either end of its path):

    client -> engine   ("hello", PROTOCOL, keep_alive_s)   engine -> client  ("welcome", PROTOCOL, version, pid, ready)
                       ("infer", request_id, {spec, prompt, params, system, raw, loading})
                       ("cancel", request_id)
    engine -> client   ("loaded", request_id, seconds)  ("text", request_id, text)
                       ("done", request_id, GenerationDone.as_dict())  ("error", request_id, kind, message)

Everything else (`keepalive_protocol`) is frozen dataclasses. Standard library only, and cheap to
import: the warm `infer` imports this and `settings`, not the engine's event classes.
"""

from __future__ import annotations

import os
import pickle
import re
import select
import socket
import struct
from pathlib import Path
from typing import Any

from hyprstream_tui.errors import InvalidInput

PROTOCOL = 1  # bumped when a message changes: a client stops an engine that speaks another
ENV = "HYPRSTREAM_KEEP_ALIVE"
DEFAULT_KEEP_ALIVE_S = 300.0  # as Ollama's: 5 minutes
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with the terminating NUL
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smh]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: str | None) -> float | None:
    """How long an idle engine stays, from HYPRSTREAM_KEEP_ALIVE: seconds, or `30s` / `5m` / `1h`;
    unset is 5 minutes; 0 (or `off`) is None: no keep-alive engine, the model loads in-process."""
    if value is None or not value.strip():
        return DEFAULT_KEEP_ALIVE_S
    text = value.strip().lower()
    if text in ("off", "no", "false"):
        return None
    match = _DURATION.fullmatch(text)
    if match is None:
        raise InvalidInput(f"{ENV}={value!r} is not a duration: give seconds (300), or 30s, 5m or 1h; "
                           "0 turns the keep-alive engine off.")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    return seconds if seconds > 0 else None


def socket_path(home: Path) -> Path:
    """`<home>/run/engine.sock`; when that is too long for a Unix socket (a deep home), a short one
    named by a hash of the home under /tmp/hyprstream-<uid>/."""
    preferred = home / "run" / "engine.sock"
    if len(os.fsencode(str(preferred))) <= MAX_SOCKET_PATH:
        return preferred
    import hashlib

    digest = hashlib.sha256(os.fsencode(str(home))).hexdigest()[:20]
    return Path(f"/tmp/hyprstream-{os.getuid()}") / f"{digest}.sock"


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (None where the platform
    cannot tell: there the socket's 0600 mode in a 0700 folder is the guard)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def same_user(sock: socket.socket) -> bool:
    uid = peer_uid(sock)
    return uid is None or uid == os.getuid()


class Channel:
    """Pickled messages over a connected stream socket, each after its length: 4 bytes big-endian
    (-1 and then 8 bytes for a message over 2 GiB), as `multiprocessing.connection.Connection`
    frames them, whose import (about 4 ms) the CLI's warm path spares. Sending from several
    threads needs the caller's lock. Errors: OSError (closed, reset), EOFError (the other end
    closed between messages or in one)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(data)
        header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        self.sock.sendall(header + data if n < 1 << 16 else header)
        if n >= 1 << 16:
            self.sock.sendall(data)

    def recv(self) -> Any:
        (n,) = struct.unpack("!i", self._read(4))
        if n == -1:
            (n,) = struct.unpack("!Q", self._read(8))
        return pickle.loads(self._read(n))

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message (or the end) can be read within `timeout` seconds."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    def shutdown(self) -> None:
        """End both directions: a thread blocked in `recv` wakes with EOFError."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError("the other end closed the connection")
            got += k
        return bytes(buf)


def log_path(home: Path) -> Path:
    """The engine process's log (its stdout and stderr)."""
    return home / "logs" / "keepalive.log"


def stopped(log: Path) -> str:
    """What a command says when the engine went away while it waited for a reply."""
    return (f"The engine process stopped (its log: {log}): run the command again to start a new one, "
            "or add --no-keep-alive.")


def absolute_spec(spec: str) -> str:
    """`spec` with its folder paths made absolute: the engine process works in another folder."""
    model, sep, rest = spec.strip().partition(":")
    if not model or (sep and not rest):
        return spec  # the engine's parser words the mistake
    if "/" in model or model.startswith((".", "~")):
        model = str(Path(model).expanduser().absolute())
    if rest.startswith(("/", ".", "~")):
        rest = str(Path(rest).expanduser().absolute())
    return model + sep + rest


__all__ = [
    "Channel", "DEFAULT_KEEP_ALIVE_S", "ENV", "MAX_SOCKET_PATH", "PROTOCOL", "absolute_spec",
    "keep_alive_seconds", "log_path", "peer_uid", "same_user", "socket_path", "stopped",
]
