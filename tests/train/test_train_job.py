"""Training as a job, in process, on real git repositories and the tiny model: events, checkpoint
commits and their files, resume equivalence, stop, the one-writer lock, samples added mid-run."""

from __future__ import annotations

import json
import threading

import pytest

from hyprstream_tui.engine.train.config import TrainConfig
from hyprstream_tui.engine.train.job import (CheckpointCommitted, TrainFailed, TrainFinished, TrainJob, TrainStarted,
                                             TrainStep, request_stop, train_status)
from hyprstream_tui.errors import Conflict, InvalidInput
from hyprstream_tui.store.locks import FileLock
from tests.train.helpers import ANSWERS, FAST, adapter_answers, greedy_answers, load_base, make_store, qa_rows

# Resume tolerance: the same data order, learning rates, AdamW moments and RNG state are restored, so
# on one machine the resumed run is expected to be bit-identical; we allow float32 round-off.
RESUME_ATOL = 1e-6


def test_training_commits_checkpoints_and_memorises(trained):
    store = trained
    log = store.log("tiny", "qa")
    checkpoints = [c for c in log if c.kind == "checkpoint"]
    assert [c.step for c in checkpoints] == [60, 40, 20]
    assert [c.summary for c in checkpoints] == ["Checkpoint at step 60", "Checkpoint at step 40", "Checkpoint at step 20"]
    for c in checkpoints:
        assert {"loss", "lr", "samples", "tokens", "elapsed"} <= set(c.metrics)
    assert checkpoints[0].metrics["loss"] < checkpoints[-1].metrics["loss"] / 4
    assert checkpoints[0].metrics["samples"] == 240
    tip = checkpoints[0].sha
    lines = [json.loads(x) for x in store.read_file("tiny", tip, "metrics/steps.jsonl").decode().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 61))
    assert set(lines[0]) == {"step", "loss", "lr", "tokens_per_s", "time"}
    opt = store.read_file("tiny", tip, "optimizer/state.safetensors")
    assert b"opt.0.exp_avg" in opt[:4096] and b"pickle" not in opt
    wt = store.worktree("tiny", "qa")
    assert adapter_answers(store.model_dir("tiny"), wt / "adapter") == list(ANSWERS)
    base, tok = load_base(store.model_dir("tiny"))
    assert all(got != want for got, want in zip(greedy_answers(base, tok), ANSWERS))


def test_events_come_in_order(qa_store):
    events = []
    result = TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=6, learning_rate=1e-2, checkpoint_every=4),
                      on_event=events.append).run()
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TrainStarted"] + ["TrainStep"] * 4 + ["CheckpointCommitted"] + ["TrainStep"] * 2 + \
        ["CheckpointCommitted", "TrainFinished"]
    start, steps = events[0], [e for e in events if isinstance(e, TrainStep)]
    assert start == TrainStarted(model="tiny", adapter="qa", step=0, target=6, resumed=False, samples=4,
                                 learning_rate=1e-2)
    assert [e.step for e in steps] == list(range(1, 7)) and all(e.tokens_per_s > 0 and e.loss > 0 for e in steps)
    assert result == events[-1] and result.stopped is False and result.commit == qa_store.head("tiny", "adapter/" + _uuid(qa_store))
    assert not train_status(qa_store, "tiny", "qa").running


def _uuid(store, name="qa"):
    return store.resolve_adapter("tiny", name).uuid


def _weights(store, commit):
    from safetensors.torch import load

    return load(store.read_file("tiny", commit, "adapter/adapter_model.safetensors"))


def _losses(store, commit):
    data = store.read_file("tiny", commit, "metrics/steps.jsonl").decode()
    return [json.loads(x)["loss"] for x in data.splitlines()]


def test_resume_20_plus_20_matches_40(tmp_path, tiny_model_src):
    """Stop at step 20 (a checkpoint), start again: the run continues its schedule, data order,
    optimizer and RNG, and ends where 40 uninterrupted steps end."""
    import torch

    config = TrainConfig(steps=40, learning_rate=3e-2, checkpoint_every=15, batch_size=3)
    straight = make_store(tmp_path / "a", tiny_model_src)
    TrainJob(straight, "tiny", "qa", config).run()

    split = make_store(tmp_path / "b", tiny_model_src)
    cancel = threading.Event()

    def stop_at_20(event):
        if isinstance(event, TrainStep) and event.step == 20:
            cancel.set()

    first = TrainJob(split, "tiny", "qa", config, on_event=stop_at_20, cancel=cancel).run()
    assert first.stopped and first.step == 20
    assert split.log("tiny", "qa")[0].summary == "Checkpoint at step 20"
    events = []
    second = TrainJob(split, "tiny", "qa", config, on_event=events.append).run()
    assert events[0].resumed and events[0].step == 20 and events[0].target == 40
    assert not second.stopped and second.step == 40

    a, b = _weights(straight, straight.log("tiny", "qa")[0].sha), _weights(split, second.commit)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= RESUME_ATOL
    la, lb = _losses(straight, straight.log("tiny", "qa")[0].sha), _losses(split, second.commit)
    assert len(la) == len(lb) == 40
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5
    assert torch.isfinite(torch.tensor(lb)).all()


def test_a_finished_run_is_followed_by_a_new_one(qa_store):
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=3, learning_rate=1e-2, checkpoint_every=10)).run()
    events = []
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=2, learning_rate=1e-2), on_event=events.append).run()
    assert (events[0].step, events[0].target, events[0].resumed) == (3, 5, False)
    assert [c.step for c in qa_store.log("tiny", "qa") if c.kind == "checkpoint"] == [5, 3]


def test_changing_the_schedule_of_an_unfinished_run_is_refused(qa_store):
    cancel = threading.Event()
    cancel_after = lambda e: isinstance(e, TrainStep) and cancel.set()  # noqa: E731
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=10, learning_rate=1e-2), on_event=cancel_after, cancel=cancel).run()
    tip = qa_store.head("tiny", "adapter/" + _uuid(qa_store))
    with pytest.raises(InvalidInput, match="unfinished run .*`learning_rate`.*`new_run`"):
        TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=10, learning_rate=2e-2), explicit={"learning_rate"}).run()
    with pytest.raises(InvalidInput, match="unfinished run .*steps"):
        TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=20), explicit={"steps"}).run()
    assert qa_store.head("tiny", "adapter/" + _uuid(qa_store)) == tip
    events = []
    cancel.clear()
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=10, learning_rate=1e-2, checkpoint_every=7),
             explicit={"steps", "learning_rate", "checkpoint_every"}, on_event=cancel_after, cancel=cancel).run()
    assert qa_store.log("tiny", "qa")[0].summary == "Checkpoint at step 2"  # resumed: same options
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=4, learning_rate=2e-2, new_run=True), on_event=events.append).run()
    assert (events[0].step, events[0].target, events[0].resumed) == (2, 6, False)


def test_cancel_finishes_the_step_and_commits(qa_store):
    cancel = threading.Event()
    events = []

    def on_event(e):
        events.append(e)
        if isinstance(e, TrainStep) and e.step == 3:
            cancel.set()

    result = TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=50, learning_rate=1e-2, checkpoint_every=10),
                      on_event=on_event, cancel=cancel).run()
    assert result.stopped and result.step == 3
    assert isinstance(events[-2], CheckpointCommitted) and events[-2].step == 3
    assert qa_store.log("tiny", "qa")[0].summary == "Checkpoint at step 3"


def test_one_writer_per_adapter(qa_store):
    """A second start while the train lock is held is refused and changes nothing; status sees
    the holder; another adapter of the same model may train meanwhile."""
    uuid = _uuid(qa_store)
    tip = qa_store.head("tiny", f"adapter/{uuid}")
    holder = FileLock(qa_store.train_lock_path("tiny", uuid), "x").acquire(wait=0)
    try:
        holder.update(state="training", step=7, target=50, loss=1.5, lr=1e-3, tokens_per_s=100.0, eta_s=12.0)
        with pytest.raises(Conflict, match="training already"):
            TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=2)).run()
        st = train_status(qa_store, "tiny", "qa")
        assert st.running and st.step == 7 and st.loss == 1.5 and st.pid
        qa_store.create_adapter("tiny", "other")
        from hyprstream_tui.engine.train.samples import add_samples

        add_samples(qa_store, "tiny", "other", qa_rows()[:2])
        assert not TrainJob(qa_store, "tiny", "other", TrainConfig(steps=2, learning_rate=1e-2)).run().stopped
    finally:
        holder.release()
    assert qa_store.head("tiny", f"adapter/{uuid}") == tip


def test_status_and_stop_from_outside_while_running(qa_store):
    """What another terminal does: status from the lock's heartbeat, stop through the stop file."""
    seen = threading.Event()
    job = TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=100000, learning_rate=1e-3, checkpoint_every=1000),
                   on_event=lambda e: isinstance(e, TrainStep) and e.step >= 5 and seen.set())
    thread = job.start()
    assert seen.wait(60)
    st = train_status(qa_store, "tiny", "qa")
    assert st.running and st.state == "training" and st.step >= 1 and st.target == 100000 and st.eta_s > 0
    assert request_stop(qa_store, "tiny", "qa", wait=30)
    thread.join(10)
    st = train_status(qa_store, "tiny", "qa")
    assert not st.running and st.last_checkpoint_step == st.step >= 5
    with pytest.raises(Conflict, match="not training"):
        request_stop(qa_store, "tiny", "qa")


def test_samples_added_while_running_join_at_the_next_epoch(qa_store):
    """Batch 2 over 4 samples: 2 steps per epoch. A sample added during step 1 is not used in
    epoch 0's second step, and is part of epoch 1."""
    from hyprstream_tui.engine.train.samples import add_samples

    sizes = {}
    box = {}

    def on_event(e):
        if isinstance(e, TrainStep):
            sizes[e.step] = (e.epoch, box["job"].trainer.state.epoch_size)
            if e.step == 1:
                add_samples(qa_store, "tiny", "qa", [{"input": "Fifth?", "output": "Yes, the fifth."}])

    box["job"] = TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=5, batch_size=2, learning_rate=1e-2),
                          on_event=on_event)
    box["job"].run()
    assert sizes[1] == sizes[2] == (0, 4)
    assert sizes[3] == sizes[4] == sizes[5] == (1, 5)
    tip = qa_store.log("tiny", "qa")[0]
    assert tip.summary == "Checkpoint at step 5" and tip.metrics["samples"] == 4 + 5
    assert qa_store.read_file("tiny", tip.sha, "data/samples.jsonl").count(b"\n") == 5


def test_empty_sample_set_and_unknown_adapter_change_nothing(qa_store):
    from hyprstream_tui.errors import NotFound

    qa_store.create_adapter("tiny", "empty")
    before = {a.name: a.tip for a in qa_store.list_adapters("tiny")}
    with pytest.raises(InvalidInput, match="no samples"):
        TrainJob(qa_store, "tiny", "empty", TrainConfig(steps=2)).run()
    with pytest.raises(NotFound):
        TrainJob(qa_store, "tiny", "nope", TrainConfig(steps=2)).run()
    assert {a.name: a.tip for a in qa_store.list_adapters("tiny")} == before


def test_failure_is_an_event_and_keeps_the_last_checkpoint(qa_store):
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=2, learning_rate=1e-2)).run()
    tip = qa_store.head("tiny", "adapter/" + _uuid(qa_store))
    events = []

    def explode(e):
        events.append(e)
        if isinstance(e, TrainStep):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=2, learning_rate=1e-2), on_event=explode).run()
    assert isinstance(events[-1], TrainFailed) and "boom" in events[-1].message
    assert qa_store.head("tiny", "adapter/" + _uuid(qa_store)) == tip
    assert not train_status(qa_store, "tiny", "qa").running


def test_tag_best_marks_the_lowest_loss_checkpoint(qa_store):
    events = []
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=30, checkpoint_every=10, tag_best=True, **{"learning_rate": 3e-2}),
             on_event=events.append).run()
    commits = [e for e in events if isinstance(e, CheckpointCommitted)]
    best = min(commits, key=lambda e: e.loss)
    assert qa_store.resolve_adapter("tiny", "qa/best").tip == best.commit
    assert isinstance(events[-1], TrainFinished)
