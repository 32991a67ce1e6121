"""A training job in a process of its own, reporting back through a pipe (the TUI's way to train).

In the TUI's process, training's Python thread takes the interpreter lock from the event loop
hundreds of times a second, and a nice'd thread that holds it waits behind torch's own workers for
a core: a key press could wait tens of milliseconds to be drawn. In a child process the event loop
keeps its interpreter to itself, a crash in the job cannot take the app down, and the job's
threads run at a lower priority (nice +10) than the UI.

Children fork from the forkserver of `engine.forkserver` (torch, transformers, PEFT and the
training loop already imported, lower priority), so a job starts as fast as it would in-process.
Events cross as the job's own frozen dataclasses; a stop request crosses the other way, and a
parent that goes away counts as one: the child finishes its step, commits and exits.

Never imports torch here: only the forkserver and its children do.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Collection

from hyprstream_tui.engine.forkserver import context, log_to, rebuild_error, settings, take_settings
from hyprstream_tui.errors import HyprError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.job import TrainEvent, TrainFinished
    from hyprstream_tui.settings import Paths

def run_training(paths: "Paths", model: str, adapter: str, config: "TrainConfig", *,
                 on_event: Callable[["TrainEvent"], None], cancel: threading.Event,
                 explicit: Collection[str] = ()) -> "TrainFinished":
    """Train `adapter` of `model` in a child process until its run ends or `cancel` is set.

    Events reach `on_event` (from this thread) as they happen; returns the job's TrainFinished, or
    raises the HyprError the job raised (the same class and message as in-process)."""
    ctx = context()
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(theirs, paths, model, adapter, config, tuple(explicit), settings()),
                       name=f"hyprstream-train-{adapter}", daemon=False)
    proc.start()
    theirs.close()
    stopper = threading.Thread(target=_forward_stop, args=(cancel, ours, proc), daemon=True)
    stopper.start()
    outcome: tuple | None = None
    try:
        while outcome is None:
            if not ours.poll(0.2):
                if proc.is_alive():
                    continue
                if not ours.poll(0):  # gone, and nothing left to read
                    break
            try:
                message = ours.recv()
            except (EOFError, OSError):
                break
            if message[0] == "event":
                on_event(message[1])
            else:
                outcome = message
    finally:
        if outcome is None and proc.is_alive():  # on_event raised: stop the job, keep its step
            try:
                ours.send(("stop",))
            except (OSError, ValueError):
                pass
        proc.join()
        cancel_sent = cancel.is_set()
        ours.close()
    if outcome is not None and outcome[0] == "done":
        return outcome[1]
    if outcome is not None and outcome[0] == "error":
        raise rebuild_error(outcome[1], outcome[2]) or HyprError(outcome[2])
    what = "was stopped" if cancel_sent else "ended"
    raise HyprError(f"The training process {what} without a result (exit code {proc.exitcode}): "
                    f"the last checkpoint is kept; start the training again to resume.")


def _forward_stop(cancel: threading.Event, conn: "Connection", proc: "BaseProcess") -> None:
    while proc.is_alive():
        if cancel.wait(0.2):
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
            return


def _child(conn: "Connection", paths: "Paths", model: str, adapter: str, config: "TrainConfig",
           explicit: tuple[str, ...], env: dict[str, str]) -> None:
    """The job, in the child. Everything it reports goes through `conn`."""
    take_settings(env)
    from hyprstream_tui.engine.train.distributed import make_job
    from hyprstream_tui.store import Store

    log_to(paths.home / "logs" / "training.log")
    cancel = threading.Event()
    send_lock = threading.Lock()

    def listen() -> None:
        try:
            while conn.recv()[0] != "stop":
                pass
        except (EOFError, OSError):
            pass  # the parent went away: stop as if asked
        cancel.set()

    def send(*message: Any) -> None:
        with send_lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                cancel.set()  # nobody is listening any more: finish the step and commit

    threading.Thread(target=listen, daemon=True).start()
    try:
        job = make_job(Store(paths), model, adapter, config, on_event=lambda e: send("event", e),
                       cancel=cancel, explicit=explicit)  # config.nproc > 1: a group, launched from here
        send("done", job.run())
    except HyprError as exc:
        send("error", type(exc).__name__, exc.message)
    except BaseException as exc:  # noqa: BLE001 - a bug: reported as one line, the parent raises it
        send("error", "HyprError", f"Training failed: {type(exc).__name__}: {exc}")
