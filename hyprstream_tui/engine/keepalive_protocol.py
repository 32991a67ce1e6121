"""What the keep-alive engine and its clients share: where its files are, how long it stays, the
messages they exchange, and the checks that keep its socket to its own user.

One engine process per home (`engine.keepalive`) listens on a Unix socket; each CLI command
(`engine.keepalive_client`) connects, says `Hello`, sends `Infer` / `Chat` / `Cancel` /
`StatusRequest` / `Stop`, and reads the engine's own event dataclasses back (pickled by
`multiprocessing.connection`). The socket file is 0600 in a 0700 folder, and each side checks that
the other runs as the same user (SO_PEERCRED); it is never a TCP port.

Standard library and the light engine modules only: the client imports this, and it must not
import torch, transformers or pygit2.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hyprstream_tui.errors import InvalidInput, StorageError

if TYPE_CHECKING:
    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.settings import Paths

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


# ---- where things are ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class EngineFiles:
    """The keep-alive engine's files for one home."""

    home: Path
    socket: Path
    log: Path
    lock: Path  # held by the engine process for its whole life: one per home
    start_lock: Path  # held by a client while it starts one: racing commands start one

    @classmethod
    def of(cls, paths: "Paths") -> "EngineFiles":
        return cls(home=paths.home, socket=socket_path(paths.home),
                   log=paths.home / "logs" / "keepalive.log",
                   lock=paths.locks / "keepalive.lock", start_lock=paths.locks / "keepalive-start.lock")


def socket_path(home: Path) -> Path:
    """`<home>/run/engine.sock`; when that is too long for a Unix socket (a deep home), a short one
    named by a hash of the home under /tmp/hyprstream-<uid>/."""
    preferred = home / "run" / "engine.sock"
    if len(os.fsencode(str(preferred))) <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(os.fsencode(str(home))).hexdigest()[:20]
    return Path(f"/tmp/hyprstream-{os.getuid()}") / f"{digest}.sock"


def private_folder(folder: Path) -> None:
    """Create `folder` (mode 0700) or check that it is ours and nobody else's: a folder of another
    user's in /tmp could hold a socket that impersonates the engine."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise StorageError(f"{folder} is not a folder of yours: remove it, or turn the keep-alive engine "
                           f"off with {ENV}=0.")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)


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


# ---- messages (client -> engine) ----------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Loading:
    """A command's load options (`--dtype`, `--device`, `--quantize`, `--allow-pickle`) and
    `--threads`: they travel with each request, the engine keeps a model per set of options."""

    dtype: str = "auto"
    device: str = "auto"
    quantize: str | None = None
    allow_pickle: bool = False
    threads: int | None = None

    def load_options(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "device": self.device, "quantize": self.quantize,
                "allow_pickle": self.allow_pickle}


@dataclass(frozen=True, kw_only=True)
class Hello:
    protocol: int
    keep_alive_s: float | None  # the idle timeout this command asks for (the latest one wins);
    # None: leave it (`hyprstream engine status`)


@dataclass(frozen=True, kw_only=True)
class Infer:
    """`hyprstream infer`: the engine decides between the chat template and plain text."""

    request_id: str
    spec: str
    prompt: str
    params: "SamplingParams"
    system: str | None = None
    raw: bool = False
    loading: Loading = field(default_factory=Loading)


@dataclass(frozen=True, kw_only=True)
class Chat:
    request_id: str
    spec: str
    messages: tuple[Mapping[str, str], ...]
    params: "SamplingParams"
    loading: Loading = field(default_factory=Loading)


@dataclass(frozen=True, kw_only=True)
class Cancel:
    request_id: str


@dataclass(frozen=True, kw_only=True)
class StatusRequest:
    pass


@dataclass(frozen=True, kw_only=True)
class Stop:
    pass


# ---- replies (engine -> client; events of requests are the engine's own dataclasses) ------------
@dataclass(frozen=True, kw_only=True)
class Welcome:
    protocol: int
    version: str
    pid: int


@dataclass(frozen=True, kw_only=True)
class LoadedInfo:
    name: str
    commit: str | None
    dtype: str
    device: str
    quantize: str | None = None


@dataclass(frozen=True, kw_only=True)
class Status:
    pid: int
    version: str
    home: str
    socket: str
    log: str
    started: float  # time.time() when it started
    keep_alive_s: float
    idle_s: float  # since the last request ended (0 while a command is connected)
    connections: int  # open connections besides the one asking
    models: tuple[LoadedInfo, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Stopping:
    pid: int


__all__ = [
    "Cancel", "Chat", "DEFAULT_KEEP_ALIVE_S", "ENV", "EngineFiles", "Hello", "Infer", "LoadedInfo",
    "Loading", "PROTOCOL", "Status", "StatusRequest", "Stop", "Stopping", "Welcome", "keep_alive_seconds",
    "peer_uid", "private_folder", "same_user", "socket_path",
]
