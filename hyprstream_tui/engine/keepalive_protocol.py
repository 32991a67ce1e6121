"""What the keep-alive engine and its clients share: where its files are, how long it stays, the
messages they exchange, and the checks that keep its socket to its own user.

One engine process per home (`engine.keepalive`) listens on a Unix socket; each CLI command
(`engine.keepalive_client`) connects, says `Hello`, sends `Infer` / `Chat` / `Cancel` /
`StatusRequest` / `Stop`, and reads the engine's own event dataclasses back (pickled, each after
its length: `keepalive_wire.Channel`). The socket file is 0600 in a 0700 folder, and each side
checks that the other runs as the same user (SO_PEERCRED); it is never a TCP port. The light part
(socket path, framing, the warm `infer`'s plain messages) is `keepalive_wire`, re-exported here.

Standard library and the light engine modules only: the client imports this, and it must not
import torch, transformers or pygit2.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hyprstream_tui.engine.keepalive_wire import (
    DEFAULT_KEEP_ALIVE_S,
    ENV,
    MAX_SOCKET_PATH,
    PROTOCOL,
    Channel,
    keep_alive_seconds,
    log_path,
    peer_uid,
    same_user,
    socket_path,
)
from hyprstream_tui.errors import StorageError

if TYPE_CHECKING:
    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.settings import Paths


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
                   log=log_path(paths.home),
                   lock=paths.locks / "keepalive.lock", start_lock=paths.locks / "keepalive-start.lock")


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
    ready: bool = True  # its warm-up (torch, a model it was started to load) is done


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
    ready: bool = True  # its warm-up done (`Welcome.ready`)


@dataclass(frozen=True, kw_only=True)
class Stopping:
    pid: int


__all__ = [
    "Cancel", "Channel", "Chat", "DEFAULT_KEEP_ALIVE_S", "ENV", "EngineFiles", "Hello", "Infer", "LoadedInfo",
    "Loading", "PROTOCOL", "Status", "StatusRequest", "Stop", "Stopping", "Welcome", "keep_alive_seconds",
    "MAX_SOCKET_PATH", "peer_uid", "private_folder", "same_user", "socket_path",
]
