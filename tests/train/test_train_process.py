"""Training in a child process (the TUI's way): events come back in order, a stop request and a
vanished parent both end in a committed checkpoint, and errors keep their class and message."""

from __future__ import annotations

import os
import threading

import pytest

from hyprstream_tui.engine.train.config import TrainConfig
from hyprstream_tui.engine.train.job import (
    CheckpointCommitted,
    TrainFinished,
    TrainStarted,
    TrainStep,
    train_status,
)
from hyprstream_tui.engine.forkserver import context, settings
from hyprstream_tui.engine.train.process import _child, run_training
from hyprstream_tui.errors import InvalidInput
from tests.train.helpers import FAST


def test_a_job_in_a_child_process_reports_every_event_and_commits(qa_store):
    events, pids = [], set()

    def on_event(event):
        events.append(event)
        if isinstance(event, TrainStep) and not pids:
            pids.add(train_status(qa_store, "tiny", "qa").pid)  # who holds the training lock

    result = run_training(qa_store.paths, "tiny", "qa", TrainConfig(steps=40, **FAST),
                          on_event=on_event, cancel=threading.Event())
    assert pids and os.getpid() not in pids  # the job ran in another process
    assert isinstance(events[0], TrainStarted) and events[-1] == result
    steps = [e.step for e in events if isinstance(e, TrainStep)]
    assert steps == list(range(1, 41))
    checkpoints = [e for e in events if isinstance(e, CheckpointCommitted)]
    assert [c.step for c in checkpoints] == [20, 40]
    assert isinstance(result, TrainFinished) and not result.stopped and result.step == 40
    log = qa_store.log("tiny", "qa")
    assert log[0].sha == result.commit == checkpoints[-1].commit and log[0].step == 40


def test_cancel_stops_the_child_after_a_committed_step(qa_store):
    cancel = threading.Event()

    def on_event(event):
        if isinstance(event, TrainStep) and event.step == 3:
            cancel.set()

    result = run_training(qa_store.paths, "tiny", "qa", TrainConfig(steps=200, **FAST),
                          on_event=on_event, cancel=cancel)
    assert result.stopped and 3 <= result.step < 200
    tip = qa_store.log("tiny", "qa")[0]
    assert tip.sha == result.commit and tip.kind == "checkpoint" and tip.step == result.step
    assert not train_status(qa_store, "tiny", "qa").running


def test_errors_keep_their_class_and_message(tiny_store):
    tiny_store.create_adapter("tiny", "empty")
    with pytest.raises(InvalidInput, match="has no samples yet"):
        run_training(tiny_store.paths, "tiny", "empty", TrainConfig(steps=5),
                     on_event=lambda e: None, cancel=threading.Event())


def test_a_vanished_parent_counts_as_a_stop_request(qa_store):
    """The child's end of the pipe closing (the app was killed) makes it commit and exit."""
    ctx = context()
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(theirs, qa_store.paths, "tiny", "qa",
                                            TrainConfig(steps=500, **FAST), (), settings()))
    proc.start()
    theirs.close()
    while True:
        kind, event = ours.recv()[:2]
        if isinstance(event, TrainStep) and event.step >= 2:
            break
    ours.close()
    proc.join(timeout=60)
    assert proc.exitcode == 0
    tip = qa_store.log("tiny", "qa")[0]
    assert tip.kind == "checkpoint" and 2 <= tip.step < 500
    assert not train_status(qa_store, "tiny", "qa").running
