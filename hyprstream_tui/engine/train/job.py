"""Training as a job: one writer per adapter (the train lock), events to a callback, a cancel token.

    job = TrainJob(store, "tiny", "my-adapter", TrainConfig(steps=100), on_event=print, cancel=event)
    result = job.run()            # in a worker thread for a UI; returns TrainFinished

The train lock doubles as the heartbeat: its JSON content (pid, step, loss, tokens/s, ETA, last
checkpoint) is what `train_status` reads from another process. Stopping, whether by the cancel
token, `request_stop` (a stop file next to the lock) or Ctrl-C in the CLI, finishes the step in
progress, commits a checkpoint and returns.

A group of processes (distributed.py) is one job too: its launcher holds the lock and writes the
heartbeat (with every rank's loss share and tokens/s); its ranks run this same loop (rank.py).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Union

from hyprstream_tui.engine.train.config import TrainConfig
from hyprstream_tui.engine.train.samples import read_rows, samples_lock
from hyprstream_tui.errors import Conflict, HyprError, InvalidInput
from hyprstream_tui.store.locks import FileLock, is_locked, read_info

if TYPE_CHECKING:
    from hyprstream_tui.engine.train.loop import Trainer
    from hyprstream_tui.store import Store
    from hyprstream_tui.store.types import AdapterInfo


# ---- events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainStarted:
    model: str
    adapter: str
    step: int  # steps already done (resumed from the branch tip)
    target: int  # the step this run ends at
    resumed: bool
    samples: int
    learning_rate: float | None = None  # the run's peak rate (given, the default rule's, or the resumed run's)
    processes: int = 1  # ranks training together (distributed.py)
    batch_size: int | None = None  # in a group: samples per step and process


@dataclass(frozen=True)
class TrainStep:
    step: int
    target: int
    loss: float
    lr: float
    tokens_per_s: float
    epoch: int
    elapsed: float
    eta_s: float
    ranks: tuple[tuple[int, float, float, int], ...] = ()  # in a group: (rank, loss share, tokens/s, pid)


@dataclass(frozen=True)
class CheckpointCommitted:
    step: int
    commit: str
    loss: float | None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainFinished:
    step: int
    commit: str  # the branch tip: the last checkpoint
    stopped: bool  # True when stopped before the run's last step


@dataclass(frozen=True)
class TrainFailed:
    message: str
    step: int | None


TrainEvent = Union[TrainStarted, TrainStep, CheckpointCommitted, TrainFinished, TrainFailed]


# ---- status across processes -------------------------------------------------------------------
@dataclass(frozen=True)
class TrainStatus:
    model: str
    adapter: str
    running: bool
    pid: int | None = None
    state: str = "idle"  # idle, loading, training, checkpointing
    step: int | None = None
    target: int | None = None
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    updated: float | None = None
    processes: int | None = None  # in a group: how many ranks
    ranks: list[dict[str, Any]] | None = None  # in a group: {rank, loss, tokens_per_s, pid} each


def stop_path(lock_path: Path) -> Path:
    return lock_path.with_suffix(".stop")


def train_status(store: Store, model: str, ref: str) -> TrainStatus:
    adapter = store.resolve_adapter(model, ref)
    lock_path = store.train_lock_path(model, adapter.uuid)
    if is_locked(lock_path):
        info: dict[str, Any] = {}
        for _ in range(20):  # the holder rewrites the file in place: retry a torn read
            info = read_info(lock_path)
            if info.get("pid"):
                break
            time.sleep(0.01)
        keys = ("pid", "step", "target", "loss", "lr", "tokens_per_s", "eta_s", "last_checkpoint",
                "last_checkpoint_step", "updated", "processes", "ranks")
        return TrainStatus(model=model, adapter=adapter.name, running=True, state=info.get("state") or "loading",
                           **{k: info.get(k) for k in keys})
    last = next((c for c in store.log(model, adapter.uuid) if c.kind == "checkpoint"), None)
    if last is None:
        return TrainStatus(model=model, adapter=adapter.name, running=False)
    loss = last.metrics.get("loss")
    return TrainStatus(model=model, adapter=adapter.name, running=False, step=last.step,
                       loss=loss if isinstance(loss, (int, float)) else None, last_checkpoint=last.sha,
                       last_checkpoint_step=last.step, updated=float(last.time))


def request_stop(store: Store, model: str, ref: str, *, wait: float = 0.0) -> bool:
    """Ask the process training `ref` to finish its step, commit and exit. With `wait`, wait up to
    that many seconds for it to let go of the adapter; returns True once it has."""
    from hyprstream_tui.store.atomic import write_text

    adapter = store.resolve_adapter(model, ref)
    lock_path = store.train_lock_path(model, adapter.uuid)
    if not is_locked(lock_path):
        raise Conflict(f"Adapter {adapter.name!r} of {model!r} is not training.")
    write_text(stop_path(lock_path), f"{os.getpid()}\n")
    deadline = time.monotonic() + wait
    while is_locked(lock_path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def acquire_train_lock(store: Store, model: str, adapter: AdapterInfo) -> FileLock:
    """The adapter's train lock (one writer), or Conflict naming the holder; its status fields reset."""
    path = store.train_lock_path(model, adapter.uuid)
    tip = store.log(model, adapter.uuid, 1)[0]
    last, last_step = (tip.sha, tip.step) if tip.kind == "checkpoint" else (None, None)
    try:
        lock = FileLock(path, f"Adapter {adapter.name!r}").acquire(wait=0)
    except Conflict:
        pid = read_info(path).get("pid", "another process")
        raise Conflict(f"Adapter {adapter.name!r} of {model!r} is training already (pid {pid}): follow it "
                       f"with `hyprstream lora train status {adapter.name}` or stop it with "
                       f"`hyprstream lora train stop {adapter.name}`.") from None
    # The file may still hold the status of a killed holder: every field is rewritten.
    lock.update(state="loading", model=model, adapter=adapter.name, uuid=adapter.uuid, step=None, target=None,
                loss=None, lr=None, tokens_per_s=None, eta_s=None, last_checkpoint=last,
                last_checkpoint_step=last_step, updated=time.time(), processes=None, ranks=None)
    return lock


# ---- the job -----------------------------------------------------------------------------------
class TrainJob:
    """Train one adapter until its run ends or the job is cancelled. Not reusable."""

    HEARTBEAT_S = 0.25

    # Set by run(): the train lock (its file is the heartbeat) and the stop file beside it.
    _lock: FileLock
    _stop_file: Path
    # Set by _train():
    adapter: AdapterInfo
    tip: str  # the branch tip: the last checkpoint committed
    best: float | None  # the lowest checkpoint loss so far, with config.tag_best

    def __init__(self, store: Store, model: str, adapter: str, config: TrainConfig, *,
                 on_event: Callable[[TrainEvent], None] | None = None, cancel: threading.Event | None = None,
                 explicit: Collection[str] = ()) -> None:
        self.store = store
        self.model = model
        self.ref = adapter
        self.config = config
        self.on_event = on_event or (lambda _event: None)
        self.cancel = cancel or threading.Event()
        self.explicit = explicit
        self.trainer: Trainer | None = None  # once training has started
        self._beat = 0.0

    def start(self) -> threading.Thread:
        """Run in a daemon thread (errors are delivered as TrainFailed)."""
        thread = threading.Thread(target=self._run_quietly, name=f"train-{self.ref}", daemon=True)
        thread.start()
        return thread

    def _run_quietly(self) -> None:
        try:
            self.run()
        except BaseException:  # noqa: BLE001 - reported through TrainFailed already
            pass

    def run(self) -> TrainFinished:
        adapter = self.store.worktree_info(self.model, self.ref)
        if not read_rows(self.store, self.model, adapter.tip):
            raise InvalidInput(f"Adapter {adapter.name!r} has no samples yet: add some with "
                               f"`hyprstream lora train sample {adapter.name} --input ... --output ...`.")
        self._lock = self._acquire(adapter)
        self._stop_file = stop_path(self._lock.path)
        try:
            self._stop_file.unlink(missing_ok=True)
            return self._train(adapter)
        except BaseException as exc:
            state = getattr(self.trainer, "state", None)  # None until Trainer.setup() planned the run
            message = exc.message if isinstance(exc, HyprError) else f"{type(exc).__name__}: {exc}"
            self.on_event(TrainFailed(message=message, step=state.step if state else None))
            raise
        finally:
            self._stop_file.unlink(missing_ok=True)
            self._lock.release()

    def _acquire(self, adapter: AdapterInfo) -> FileLock:
        return acquire_train_lock(self.store, self.model, adapter)

    def cancelled(self) -> bool:
        return self.cancel.is_set() or self._stop_file.exists()

    def _prepare(self, adapter: AdapterInfo) -> Trainer:
        """The worktree at the branch tip, and a Trainer set up on it."""
        from hyprstream_tui.engine.train.loop import Trainer

        with samples_lock(self.store, self.model, adapter.uuid).acquire(wait=60):
            worktree = self.store.reset_worktree(self.model, adapter.uuid)
        self.trainer = trainer = Trainer(base_dir=self.store.model_dir(self.model), worktree=worktree,
                                         config=self.config, explicit=self.explicit)
        trainer.setup()
        return trainer

    def _train(self, adapter: AdapterInfo) -> TrainFinished:
        trainer = self._prepare(adapter)
        self.adapter = adapter
        self.tip, committed_step = adapter.tip, trainer.state.step
        self.best = self._best_loss() if self.config.tag_best else None
        self.on_event(TrainStarted(model=self.model, adapter=adapter.name, step=trainer.state.step,
                                   target=trainer.target_step, resumed=trainer.resumed, samples=trainer.sample_count,
                                   learning_rate=trainer.state.hparams["learning_rate"], processes=trainer.world,
                                   batch_size=trainer.state.hparams["batch_size"] if trainer.world > 1 else None))
        ema = None
        while not trainer.done and not self.cancelled():
            r = trainer.step()
            ema = r.seconds if ema is None else 0.9 * ema + 0.1 * r.seconds
            ranks = tuple((x.rank, x.loss, x.tokens_per_s, x.pid) for x in trainer.rank_stats)
            tps = sum(x[2] for x in ranks) if ranks else r.tokens / max(r.seconds, 1e-9)
            event = TrainStep(step=r.step, target=trainer.target_step, loss=r.loss, lr=r.lr, tokens_per_s=tps,
                              epoch=r.epoch, elapsed=trainer.state.elapsed, eta_s=(trainer.target_step - r.step) * ema,
                              ranks=ranks)
            self.on_event(event)
            self._heartbeat(event)
            if r.step % self.config.checkpoint_every == 0 or trainer.done:
                self._checkpoint(trainer)
                committed_step = r.step
        if trainer.state.step != committed_step:
            self._checkpoint(trainer)
        result = TrainFinished(step=trainer.state.step, commit=self.tip, stopped=not trainer.done)
        self.on_event(result)
        return result

    def _heartbeat(self, event: TrainStep, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._beat >= self.HEARTBEAT_S:
            self._beat = now
            group: dict[str, Any] = {}
            if event.ranks:
                group = dict(processes=len(event.ranks), ranks=[
                    {"rank": r, "loss": round(loss, 6), "tokens_per_s": round(tps, 1), "pid": pid}
                    for r, loss, tps, pid in event.ranks])
            self._status(state="training", step=event.step, target=event.target, loss=event.loss, lr=event.lr,
                              tokens_per_s=round(event.tokens_per_s, 1), eta_s=round(event.eta_s, 1),
                              updated=time.time(), **group)

    def _status(self, **info: Any) -> None:
        """What `train status` shows: written into the lock file (a group's rank sends it to its launcher)."""
        self._lock.update(**info)

    def _commits(self) -> bool:
        """Whether this job writes checkpoints (in a group: rank 0 alone, while its launcher lives)."""
        return True

    def _checkpoint(self, trainer: Trainer) -> None:
        if not self._commits():
            return
        self._status(state="checkpointing", step=trainer.state.step, updated=time.time())
        metrics = trainer.save()
        info = self.store.commit_checkpoint(self.model, self.adapter.uuid, step=trainer.state.step, metrics=metrics)
        self.tip = info.sha
        tags: tuple[str, ...] = ()
        loss = metrics.get("loss")
        if self.config.tag_best and loss is not None and (self.best is None or loss < self.best):
            self.best = loss
            tags = (self.store.tag(self.model, self.adapter.uuid, "best", commit=info.sha, force=True),)
        self._status(state="training", last_checkpoint=info.sha, last_checkpoint_step=trainer.state.step,
                          updated=time.time())
        self.on_event(CheckpointCommitted(step=trainer.state.step, commit=info.sha, loss=loss, tags=tags))

    def _best_loss(self) -> float | None:
        if not self._commits():
            return None
        losses = [c.metrics["loss"] for c in self.store.log(self.model, self.adapter.uuid)
                  if c.kind == "checkpoint" and isinstance(c.metrics.get("loss"), (int, float))]
        return min(losses) if losses else None

