"""Training in a group of 2 CPU processes (torchrun, gloo) on the tiny qwen2, against the single
process: the same loss curve, the same commits, one writer, status, stop, a killed rank, resume.

Tolerance: with the same global batch (2 processes x 2 samples against 1 x 4) and seed, each step's
loss agrees with the single process's to 1e-4 (measured: about 1e-6; the loss is summed over the
global batch's answer tokens, so only float rounding differs).

Every group start costs about 15 s here (torchrun's agent and two ranks each import torch,
transformers and PEFT on 2 busy cores): one module fixture runs the scenario that several tests
read, and the kill test is the only other group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from hyprstream_tui.engine.train import checkpoint as ckpt
from hyprstream_tui.engine.train.config import TrainConfig
from hyprstream_tui.engine.train.distributed import make_job
from hyprstream_tui.engine.train.job import TrainJob, TrainStarted, TrainStep, train_status
from hyprstream_tui.errors import Conflict
from hyprstream_tui.store.locks import is_locked
from tests.helpers import REPO_ROOT, git
from tests.store.test_crash import assert_repository_sound
from tests.train.helpers import make_store

TOLERANCE = 1e-4
RUN = dict(steps=8, learning_rate=1e-2, checkpoint_every=1000, seed=0)


def losses(store, commit: str | None = None) -> list[float]:
    tip = commit or store.log("tiny", "qa")[0].sha
    lines = store.read_file("tiny", tip, ckpt.METRICS_FILE).decode().splitlines()
    return [json.loads(x)["loss"] for x in lines]


def checkpoints(store) -> list:
    return [c for c in store.log("tiny", "qa") if c.kind == "checkpoint"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_src):
    """One process trains 8 steps (batch 4 of 5 samples); a 2-process group (batch 2 each) trains the same run, is stopped from its
    step-3 event (where the test also reads the status and tries a second writer), and a second
    group start resumes it to step 8."""
    from hyprstream_tui.engine.train.samples import add_samples

    root = tmp_path_factory.mktemp("dist")
    single, group = make_store(root / "single", tiny_model_src), make_store(root / "group", tiny_model_src)
    for store in (single, group):  # 5 samples: each epoch ends with a batch of 1, and rank 1 gets none of it
        add_samples(store, "tiny", "qa", [{"input": "Name a colour.", "output": "Blue is a colour."}])
    TrainJob(single, "tiny", "qa", TrainConfig(batch_size=4, **RUN)).run()
    seen = SimpleNamespace(first=[], second=[], status=None, refused=None)
    cancel = threading.Event()

    def on_first(event) -> None:
        seen.first.append(event)
        if isinstance(event, TrainStep) and event.step == 3:
            seen.status = train_status(group, "tiny", "qa")
            try:
                TrainJob(group, "tiny", "qa", TrainConfig(steps=2)).run()
            except Conflict as exc:
                seen.refused = exc.message
            cancel.set()

    config = TrainConfig(batch_size=2, nproc=2, **RUN)
    seen.stopped = make_job(group, "tiny", "qa", config, on_event=on_first, cancel=cancel).run()
    seen.after_stop = checkpoints(group)
    seen.finished = make_job(group, "tiny", "qa", config, on_event=seen.second.append).run()
    return SimpleNamespace(single=single, group=group, **vars(seen))


def test_two_ranks_follow_the_single_process_loss_curve(runs):
    from safetensors.torch import load_file

    one, two = losses(runs.single), losses(runs.group)
    assert len(one) == len(two) == 8
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE, (one, two)
    assert one[-1] < one[0]  # it learned something
    weights = [load_file(str(s.worktree("tiny", "qa") / ckpt.ADAPTER_FILE)) for s in (runs.single, runs.group)]
    assert weights[0].keys() == weights[1].keys()
    worst = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    assert worst < 1e-4, worst  # AdamW divides by sqrt(v): rounding shows more in the weights than in the loss


def test_the_group_commits_like_a_single_process(runs):
    one, two = runs.single.log("tiny", "qa")[0], runs.group.log("tiny", "qa")[0]
    assert one.kind == two.kind == "checkpoint" and one.summary == two.summary == "Checkpoint at step 8"
    assert one.metrics.keys() == two.metrics.keys()
    for key in ("step", "samples", "tokens", "epoch", "lr"):  # counted over the global batch
        assert one.metrics[key] == two.metrics[key], key
    since_stop = losses(runs.single)[runs.stopped.step:]  # a commit's loss: the mean since the last checkpoint
    assert abs(sum(since_stop) / len(since_stop) - two.metrics["loss"]) < TOLERANCE
    lines = [s.read_file("tiny", c.sha, ckpt.METRICS_FILE).decode().splitlines()
             for s, c in ((runs.single, one), (runs.group, two))]
    assert [json.loads(x).keys() for x in lines[0]] == [json.loads(x).keys() for x in lines[1]]
    assert [json.loads(x)["step"] for x in lines[1]] == list(range(1, 9))
    changed = [git(s.model_dir("tiny"), "diff-tree", "--no-commit-id", "--name-only", "-r", c.sha).stdout.split()
               for s, c in ((runs.single, one), (runs.group, two))]
    assert changed[0] == changed[1] and "adapter/adapter_model.safetensors" in changed[0]
    assert_repository_sound(runs.group.model_dir("tiny"))


def test_stop_ends_every_rank_at_a_step_boundary_with_one_checkpoint(runs):
    stopped_at = runs.stopped.step
    assert runs.stopped.stopped and 3 <= stopped_at < 8
    assert [c.step for c in runs.after_stop] == [stopped_at]  # one checkpoint: the stop's
    assert runs.after_stop[0].sha == runs.stopped.commit
    first_lines = losses(runs.group, runs.stopped.commit)
    assert len(first_lines) == stopped_at
    steps = [e.step for e in runs.first if isinstance(e, TrainStep)]
    assert steps == list(range(1, stopped_at + 1))  # every step ran on both ranks: no partial step


def test_a_second_start_is_refused_while_the_group_trains(runs):
    assert runs.refused is not None and f"training already (pid {os.getpid()})" in runs.refused


def test_status_shows_every_rank_and_the_summed_throughput(runs):
    st = runs.status
    assert st.running and st.processes == 2 and st.pid == os.getpid()
    assert [r["rank"] for r in st.ranks] == [0, 1]
    assert len({r["pid"] for r in st.ranks} | {os.getpid()}) == 3  # two rank processes besides this one
    assert st.tokens_per_s == pytest.approx(sum(r["tokens_per_s"] for r in st.ranks), abs=1)
    assert st.step >= 1 and st.loss > 0


def test_the_next_group_start_resumes_the_stopped_run(runs):
    started = next(e for e in runs.second if isinstance(e, TrainStarted))
    assert started.resumed and started.step == runs.stopped.step and started.processes == 2
    assert runs.finished.step == 8 and not runs.finished.stopped
    assert [c.step for c in checkpoints(runs.group)] == [8, runs.stopped.step]


def test_a_killed_rank_ends_the_group_and_one_process_resumes_it(tmp_path, tiny_model_src):
    """SIGKILL rank 1 of a `lora train start --nproc 2`: the group is gone within 30 s with one
    line; the tip is a sound checkpoint; one process (the same global batch: --batch-size 4)
    resumes it with its step and optimizer state, and its losses are an uninterrupted run's."""
    home = tmp_path / "home"
    store = make_store(home, tiny_model_src)
    common = ["--steps", "1000", "--learning-rate", "1e-2"]
    env = {**os.environ, "HYPRSTREAM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hyprstream_tui", "lora", "train", "start", "qa", "--nproc", "2",
                             "--batch-size", "2", "--checkpoint-every", "2", *common], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 180
        while not ((st := train_status(store, "tiny", "qa")).ranks and (st.last_checkpoint_step or 0) >= 4):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "hyprstream_tui", "lora", "train", "start", "qa", "--steps", "2"],
                                capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
        assert second.returncode != 0 and second.stderr.startswith("error: ") and "training already" in second.stderr
        victim = next(r["pid"] for r in train_status(store, "tiny", "qa").ranks if r["rank"] == 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 30, took
    assert proc.returncode != 0
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "rank 1" in err and "SIGKILL" in err, err
    uuid = store.resolve_adapter("tiny", "qa").uuid
    assert not is_locked(store.train_lock_path("tiny", uuid))
    assert_repository_sound(store.model_dir("tiny"))
    tip = store.log("tiny", "qa")[0]
    assert tip.kind == "checkpoint" and tip.step >= 4 and tip.step % 2 == 0, out
    saved = ckpt.load(store.snapshot("tiny", tip.sha))
    assert saved is not None and saved.state.world_size == 2 and saved.state.hparams["batch_size"] == 2

    # One process, global batch 4: it resumes at the tip with the saved optimizer moments.
    config = TrainConfig(steps=1000, learning_rate=1e-2, batch_size=4)
    cancel, seen = threading.Event(), {}

    def on_event(event) -> None:
        if isinstance(event, TrainStarted):
            seen["started"] = event
            state = job.trainer.optimizer.state_dict()["state"]
            seen["moments"] = all(state[i][k].equal(v) for i, values in saved.optimizer.items() for k, v in values.items())
        if isinstance(event, TrainStep) and event.step >= tip.step + 2:
            cancel.set()

    job = TrainJob(store, "tiny", "qa", config, on_event=on_event, cancel=cancel,
                   explicit={"steps", "learning_rate", "batch_size"})
    job.run()
    assert seen["started"].resumed and seen["started"].step == tip.step and seen["moments"]
    reference = make_store(tmp_path / "reference", tiny_model_src)
    stop = threading.Event()
    TrainJob(reference, "tiny", "qa", config, cancel=stop,
             on_event=lambda e: stop.set() if isinstance(e, TrainStep) and e.step >= tip.step + 2 else None).run()
    resumed, straight = losses(store), losses(reference)
    assert len(resumed) == len(straight) == tip.step + 2
    assert max(abs(a - b) for a, b in zip(resumed, straight)) < TOLERANCE, (resumed, straight)


def test_group_options_are_checked_before_anything_starts(cli, tiny_model_src, home):
    """Bad launch options: one line naming the option, and no lock, process or commit left."""
    from tests.helpers import assert_one_line_error

    assert cli("model", "import", tiny_model_src, "--name", "tiny").returncode == 0
    assert cli("lora", "create", "--name", "qa", "--base-model", "tiny").returncode == 0
    assert_one_line_error(cli("lora", "train", "start", "qa", "--nproc", "0"), "--nproc", "at least 1")
    assert_one_line_error(cli("lora", "train", "start", "qa", "--nproc", "2", "--nnodes", "2"), "--master-addr")
    assert_one_line_error(cli("lora", "train", "start", "qa", "--nnodes", "2", "--node-rank", "2",
                              "--master-addr", "10.0.0.1"), "--node-rank", "between 0 and 1")
    assert_one_line_error(cli("lora", "train", "start", "qa", "--nproc", "2"), "no samples")


def test_the_train_form_checks_its_processes_field():
    from hyprstream_tui.errors import InvalidInput
    from hyprstream_tui.tui.screens.training_forms import check_train

    form = {"steps": "", "learning_rate": "", "batch_size": "2", "checkpoint_every": "20", "new_run": "n"}
    assert check_train({**form, "processes": "2"}).nproc == 2
    assert check_train({**form, "processes": ""}).nproc == 1
    for bad, reason in (("two", "must be a whole number"), ("0", "must be between 1")):
        with pytest.raises(InvalidInput) as err:
            check_train({**form, "processes": bad})
        assert err.value.setting == "processes" and reason in err.value.message


def _second_host(home, dest):
    """Another host's store: the same model repository (same adapter, same commits), its own worktrees."""
    import shutil

    shutil.copytree(home, dest, symlinks=True)
    shutil.rmtree(dest / "models" / "working", ignore_errors=True)
    for worktrees in (dest / "models").glob("*/.git/worktrees"):
        shutil.rmtree(worktrees)


def test_two_hosts_train_one_group_and_refuse_different_commits(tmp_path, tiny_model_src):
    """Two `start --nnodes 2` launchers, each with its own store (stand-ins for two hosts on one
    machine): host 0 commits, host 1 does not; then host 1's copy is one commit ahead and both refuse.
    About 15 s on an idle 2-core machine (six processes import torch)."""
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    a = make_store(tmp_path / "a", tiny_model_src)
    _second_host(tmp_path / "a", tmp_path / "b")
    b = Store(Paths.from_env(tmp_path / "b"))

    def both(*extra: str) -> list[subprocess.CompletedProcess]:
        from hyprstream_tui.engine.train.distributed import free_port

        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, "-m", "hyprstream_tui", "--home", str(tmp_path / h), "lora", "train",
                                   "start", "qa", "--nnodes", "2", "--node-rank", str(i), "--master-addr", "127.0.0.1",
                                   "--master-port", port, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT)
                 for i, h in enumerate("ab")]
        outs = [p.communicate(timeout=300) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]

    first = both("--steps", "4", "--batch-size", "2")
    assert [r.returncode for r in first] == [0, 0], [r.stderr for r in first]
    assert "Finished qa at step 4: checkpoint" in first[0].stdout
    assert "committed on the host with node rank 0" in first[1].stdout
    assert a.log("tiny", "qa")[0].step == 4 and b.log("tiny", "qa")[0].kind != "checkpoint"
    add_samples(b, "tiny", "qa", [{"input": "Name a colour.", "output": "Blue is a colour."}])
    refused = both("--steps", "8", "--batch-size", "2")
    for r in refused:
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "different commits" in r.stderr, r.stderr
    assert a.log("tiny", "qa")[0].step == 4
