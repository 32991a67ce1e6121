"""Training in a group of processes, on one host or several: the launcher side.

    hyprstream lora train start NAME --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]

The launcher is torch's own elastic one, `python -m torch.distributed.run` (torchrun), run as a
child of the `start` process. Why torchrun rather than accelerate's launcher: it ships with torch
(nothing more to install), its static rendezvous takes exactly --nnodes/--node-rank/--master-addr/
--master-port, it sets each rank's environment for `init_process_group`, and its agent watches the
ranks: with `--max-restarts 0`, when one rank dies it ends the others and exits, naming the rank and
its exit code or signal (which we turn into one line). accelerate would add a dependency and a
config file for no gain here: the trainer already does its own DDP and mixed precision.

Who does what:
- The `start` process (GroupJob below) stays the one the user sees: it checks the samples, takes
  the adapter's train lock for the whole group (a second `start` gets the usual one-writer error),
  resets the worktree to the branch tip, starts torchrun in a session of its own (so Ctrl-C reaches
  only this process) and relays: rank 0's events drive the progress view, its status lines go into
  the lock file (`train status` shows the ranks, step, loss and tokens/s summed over the ranks), and
  a stop request (Ctrl-C, `train stop`'s stop file, the TUI's cancel) goes to rank 0.
- Each rank (rank.py) runs the same TrainJob loop on a Trainer in group mode (loop.py, group.py):
  gloo on CPU, NCCL on GPUs (`--device cuda`: rank r of a host uses its GPU r). After every step the
  ranks all-gather their stats and a stop vote, so every rank stops after the same step; rank 0
  alone writes the worktree, the metrics and the checkpoint commits (the same commits, trailers and
  metrics a single process makes); the other ranks never touch the store's git.
- Control: a Unix socket in a private temporary folder, authenticated with a random key passed in
  the ranks' environment. Every rank connects to its host's launcher and says its pid; the host's
  local rank 0 also sends the events and status lines. If the launcher dies, the ranks see the
  socket close: the group stops after its step without committing (the lock is gone, so rank 0
  may no longer write).

Faults. A rank that dies (even by SIGKILL) closes its sockets, so the others fail at their next
collective at once, and torchrun's agent (checking every `MONITOR_S`) ends the rest with SIGTERM:
on one host the whole group is gone within about a second or two (measured: 1 s; the tests allow
30 s). A rank that hangs instead (even SIGSTOPped) ends the group after the step collectives'
timeout (HYPRSTREAM_DIST_TIMEOUT, 60 s by default; loading has 15 minutes) plus GRACE_S, when the
launcher kills what is left of its host's ranks. Either way `start` prints one line naming the rank, and
the last checkpoint stays the branch tip: the next `start` resumes from it with the same step and
optimizer state.

Data order on resume. Each epoch's order is a permutation fixed by (seed, epoch, number of
samples), and the position in it is counted in samples, whatever the number of processes. A run
resumed with another N continues at the same place in the same permutation; `batch_size` stays
per process, so each step now takes batch_size x N' samples, unless `--batch-size G/N'` keeps the
run's global batch G: then every step draws exactly the samples it would have drawn (only which
rank trains on which sample changes), and the loss curve continues as if never interrupted.

Several hosts. Every host needs the model and the adapter at the same commit in its own store
(rank 0's host commits; the others are checked against its tip at start-up and refused if they
differ), and runs the same command with its own --node-rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyprstream_tui.engine.forkserver import rebuild_error
from hyprstream_tui.engine.train.job import CheckpointCommitted, TrainFinished, TrainJob
from hyprstream_tui.engine.train.samples import samples_lock
from hyprstream_tui.errors import HyprError, InvalidInput

if TYPE_CHECKING:
    import threading
    from typing import Callable, Collection

    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.job import TrainEvent
    from hyprstream_tui.store import Store
    from hyprstream_tui.store.types import AdapterInfo

MONITOR_S = 0.5  # torchrun's agent checks its ranks this often
GRACE_S = 3.0  # after this host's rank 0 failed, how long the other ranks may take to follow it
KEY_ENV = "HYPRSTREAM_CONTROL_KEY"
RANK_ERROR = "hyprstream-rank-error: "  # how a rank reports its one line in the log


@dataclass(frozen=True, kw_only=True)
class Launch:
    """Where the group's ranks run: `nproc` per host (TrainConfig.nproc), on `nnodes` hosts."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        for name in ("nproc", "nnodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"`{name}` must be at least 1, got {value!r}.")
        if not 0 <= self.node_rank < self.nnodes:
            raise InvalidInput(f"`node_rank` must be between 0 and {self.nnodes - 1} (`nnodes` is {self.nnodes}), "
                               f"got {self.node_rank}.")
        if self.nnodes > 1 and not self.master_addr:
            raise InvalidInput("Training on several hosts needs `master_addr`: the address of the host with "
                               "`node_rank` 0, reachable from every host.")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise InvalidInput(f"`master_port` must be between 1 and 65535, got {self.master_port}.")

    @property
    def grouped(self) -> bool:
        return self.nproc * self.nnodes > 1


def make_job(store: Store, model: str, adapter: str, config: TrainConfig, *, launch: Launch | None = None,
             on_event: Callable[[TrainEvent], None] | None = None, cancel: threading.Event | None = None,
             explicit: Collection[str] = ()) -> TrainJob:
    """A TrainJob for one process, or a GroupJob when `config.nproc` or `launch` asks for more."""
    launch = launch or Launch(nproc=config.nproc)
    if launch.nproc != config.nproc:
        raise InvalidInput(f"`nproc` is {config.nproc} in the configuration but {launch.nproc} in the launch.")
    if not launch.grouped:
        return TrainJob(store, model, adapter, config, on_event=on_event, cancel=cancel, explicit=explicit)
    return GroupJob(store, model, adapter, config, launch=launch, on_event=on_event, cancel=cancel, explicit=explicit)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GroupJob(TrainJob):
    """The launcher of a group: TrainJob's lock, events and stop rules around torchrun's ranks."""

    def __init__(self, store: Store, model: str, adapter: str, config: TrainConfig, *, launch: Launch,
                 **kwargs: Any) -> None:
        super().__init__(store, model, adapter, config, **kwargs)
        self.launch = launch
        self.log_path: Path | None = None
        self._result: TrainFinished | None = None
        self._error: HyprError | None = None
        self._pids: dict[int, int] = {}  # this host's ranks: rank -> pid (from their hello)
        self._killed: set[int] = set()  # pids this launcher killed (not a fault to report)

    def _train(self, adapter: AdapterInfo) -> TrainFinished:
        with samples_lock(self.store, self.model, adapter.uuid).acquire(wait=60):
            worktree = self.store.reset_worktree(self.model, adapter.uuid)
        self.adapter, self.tip = adapter, adapter.tip
        self._lock.update(processes=self.launch.nproc * self.launch.nnodes)
        folder = Path(tempfile.mkdtemp(prefix="hs-group-"))
        key = os.urandom(32)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(folder / "control"))
        server.listen(64)
        spec = {"home": str(self.store.paths.home), "adapter": {"model": adapter.model, "uuid": adapter.uuid,
                "name": adapter.name, "branch": adapter.branch, "tip": adapter.tip},
                "worktree": str(worktree), "base_dir": str(self.store.model_dir(self.model)),
                "config": self.config.to_dict(), "explicit": sorted(self.explicit), "control": str(folder / "control")}
        self.log_path = self.store.paths.home / "logs" / f"train-{adapter.model}-{adapter.uuid}-ranks.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = None
        try:
            with open(self.log_path, "wb") as log:
                proc = subprocess.Popen(self._argv(spec), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True, env=self._env(key))
            return self._relay(proc, server, key)
        finally:
            server.close()
            if proc is not None and proc.poll() is None:  # aborted (a second Ctrl-C, an error here)
                proc.send_signal(signal.SIGTERM)  # torchrun's agent ends its ranks with it
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._kill_ranks()
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            shutil.rmtree(folder, ignore_errors=True)

    def _argv(self, spec: dict[str, Any]) -> list[str]:
        la = self.launch
        addr = la.master_addr or "127.0.0.1"
        port = la.master_port or (free_port() if la.nnodes == 1 else 29500)
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={la.nproc}", f"--nnodes={la.nnodes}",
                f"--node-rank={la.node_rank}", f"--master-addr={addr}", f"--master-port={port}", "--max-restarts=0",
                f"--monitor-interval={MONITOR_S}", "-m", "hyprstream_tui.engine.train.rank", json.dumps(spec)]

    def _env(self, key: bytes) -> dict[str, str]:
        env = {**os.environ, KEY_ENV: key.hex(), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
        # CPU ranks share the host's cores; torchrun would give each one thread.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.launch.nproc)))
        return env

    def _relay(self, proc: subprocess.Popen, server: socket.socket, key: bytes) -> TrainFinished:
        """Until torchrun exits: rank 0's events and status to ours, our stop request to every
        rank of this host. If this host's rank 0 goes without a result (it failed: a peer died or
        hung) and the rest lingers past GRACE_S, the rest is killed rather than left to torchrun's
        30 s grace for a rank that ignores SIGTERM."""
        conns: list[Connection] = []
        told: set[int] = set()
        lead: Connection | None = None
        lead_gone: float | None = None
        while True:
            exited = proc.poll() is not None
            ready = wait([server, *conns], timeout=0 if exited else 0.2)
            for r in ready:
                if r is server:
                    conn = self._accept(server, key)
                    conns += [conn] if conn is not None else []
                    continue
                assert isinstance(r, Connection)
                try:
                    message = r.recv()
                except (EOFError, OSError):
                    conns.remove(r)
                    if r is lead and self._result is None:
                        lead_gone = time.monotonic()
                    continue
                if message[0] == "hello":  # (hello, rank, pid, is this host's rank 0)
                    self._pids[message[1]] = message[2]
                    lead = r if message[3] else lead
                else:
                    self._handle(message)
            if self.cancelled():
                for conn in conns:
                    if id(conn) not in told:
                        told.add(id(conn))
                        try:
                            conn.send(("stop",))
                        except OSError:
                            pass
            if lead_gone is not None and not exited and time.monotonic() - lead_gone > GRACE_S:
                self._kill_ranks()
                lead_gone = None
            if exited and not ready:
                break
        if self._result is not None and proc.returncode == 0:
            return self._result
        raise self._failure(proc.returncode, self._error)

    def _kill_ranks(self) -> None:
        for pid in self._pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
                self._killed.add(pid)
            except OSError:
                pass

    def _handle(self, message: tuple) -> None:
        if message[0] == "event":
            event = message[1]
            if isinstance(event, TrainFinished):
                self._result = event
            elif isinstance(event, CheckpointCommitted):
                self.tip = event.commit
            self.on_event(event)
        elif message[0] == "status":
            self._lock.update(**message[1])
        elif message[0] == "error":
            self._error = rebuild_error(message[1], message[2]) or HyprError(message[2])

    def _accept(self, server: socket.socket, key: bytes) -> Connection | None:
        sock, _ = server.accept()
        conn = Connection(sock.detach())
        try:
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
        except Exception:  # noqa: BLE001 - not one of our ranks: ignore it
            conn.close()
            return None
        return conn

    def _failure(self, code: int | None, error: HyprError | None) -> HyprError:
        """One line for a group that ended without a result: a rank killed by a signal first (the
        others then fail on their sockets), then rank 0's own error, then any rank's line."""
        text = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
        where = f"(log: {self.log_path})"
        keep = "the last checkpoint is kept: start again to resume"
        dead = [(int(r), int(c), pid) for r, c, pid in
                re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", text)]
        ended = set(re.findall(r"Sending process (\d+) closing signal", text))  # torchrun's own signals...
        ended |= {str(pid) for pid in self._killed}  # ... and ours
        killed = sorted((c == -signal.SIGTERM, r, c, pid) for r, c, pid in dead if c < 0 and pid not in ended)
        if killed:
            _, rank, c, pid = killed[0]
            name = signal.Signals(-c).name if -c in signal.valid_signals() else f"signal {-c}"
            return HyprError(f"Training stopped: rank {rank} (pid {pid}) was killed by {name}, so the group "
                             f"ended; {keep} {where}.")
        if error is not None:
            return error
        lines = [ln.split(RANK_ERROR, 1)[1] for ln in text.splitlines() if RANK_ERROR in ln]
        if lines:
            return HyprError(f"Training stopped: {lines[0]}; {keep} {where}.")
        return HyprError(f"Training stopped: the group of processes ended without a result (exit code {code}); "
                         f"{keep} {where}.")
