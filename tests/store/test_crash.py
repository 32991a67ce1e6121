"""SIGKILL a real store writer at many moments: afterwards `git fsck --full --strict` is clean,
every branch tip is complete (all its LFS objects present and intact), nothing committed is lost,
and the next write works (no stale lock blocks it).

Kill points: 10 during imports and 14 during checkpoint commits by default; 100 each with
HYPRSTREAM_LONG_TESTS=1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hyprstream_tui.errors import Conflict
from hyprstream_tui.store.lfs import LfsObjects, Pointer
from tests.helpers import REPO_ROOT, git

LONG = os.environ.get("HYPRSTREAM_LONG_TESTS") == "1"
WORKER = Path(__file__).with_name("crash_worker.py")


def start_worker(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(home), *args], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL after `delay` seconds; True if it was still running (a real mid-operation kill)."""
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    return alive


def assert_repository_sound(repo: Path) -> None:
    fsck = git(repo, "fsck", "--full", "--strict", check=False)
    assert fsck.returncode == 0, fsck.stderr
    lfs = LfsObjects(repo / ".git")
    for branch in git(repo, "for-each-ref", "--format=%(refname)", "refs/heads").stdout.split():
        files = git(repo, "ls-tree", "-r", "--name-only", branch).stdout.split()
        for path in files:
            if path.endswith(".safetensors"):
                pointer = Pointer.parse(git(repo, "cat-file", "-p", f"{branch}:{path}").stdout.encode())
                assert pointer is not None and lfs.verify(pointer), (branch, path)


@pytest.fixture
def big_model(tiny_model_src, tmp_path) -> Path:
    """The tiny model plus a 32 MB extra shard, so an import takes long enough to be cut."""
    import shutil

    src = tmp_path / "bigsrc"
    shutil.copytree(tiny_model_src, src)
    save_file({"extra": np.random.default_rng(1).random((2048, 4096), dtype=np.float32)}, str(src / "extra.safetensors"))
    return src


def test_kill_during_import_leaves_no_half_model(store, home, big_model):
    # Calibrate: how long does an unkilled import take?
    proc = start_worker(home, "import", str(big_model), "calib")
    t0 = time.monotonic()
    assert proc.wait(timeout=120) == 0
    duration = time.monotonic() - t0
    rng = random.Random(1234)
    points = 100 if LONG else 10
    mid = 0
    for i in range(points):
        name = f"m{i}"
        proc = start_worker(home, "import", str(big_model), name)
        mid += kill_after(proc, rng.uniform(0, duration * 1.1))
        target = home / "models" / name
        if target.exists():  # renamed into place: must be complete
            assert_repository_sound(target)
            with pytest.raises(Conflict):
                store.import_model(big_model, name=name)
        else:  # the next command works and sweeps the leftover
            store.import_model(big_model, name=name)
            assert_repository_sound(target)
    leftovers = [p.name for p in (home / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert mid >= points // 2, f"only {mid} of {points} kills landed mid-import"


def test_kill_during_checkpoint_commits_loses_nothing_committed(tiny_store, home):
    tiny_store.create_adapter("tiny", "qa")
    repo = home / "models" / "tiny"
    proc = start_worker(home, "checkpoint", "tiny", "qa", "3")
    assert proc.wait(timeout=60) == 0
    proc = start_worker(home, "checkpoint", "tiny", "qa", "3")
    t0 = time.monotonic()
    assert proc.wait(timeout=60) == 0
    per_commit = (time.monotonic() - t0) / 3
    rng = random.Random(99)
    points = 100 if LONG else 14
    seen: list[str] = [c.sha for c in tiny_store.log("tiny", "qa")]
    for _ in range(points):
        proc = start_worker(home, "checkpoint", "tiny", "qa", "50")
        kill_after(proc, rng.uniform(0, per_commit * 3))
        assert_repository_sound(repo)
        log = tiny_store.log("tiny", "qa")
        shas = [c.sha for c in log]
        assert set(seen) <= set(shas), "a committed checkpoint was lost"
        seen = shas
        steps = [c.step for c in log if c.kind == "checkpoint"]
        assert steps == sorted(steps, reverse=True) and len(set(steps)) == len(steps)
        tip = log[0]
        weights = load_file(str(tiny_store.snapshot("tiny", tip.sha, "adapter") / "adapter_model.safetensors"))
        assert weights["w"][0, 0] == tip.step  # the tip's files are the tip's, complete
        lines = tiny_store.read_file("tiny", tip.sha, "metrics/steps.jsonl").decode().splitlines()
        assert json.loads(lines[-1])["step"] == tip.step
    # the next start resumes from the last complete checkpoint, and commits work
    proc = start_worker(home, "checkpoint", "tiny", "qa", "1")
    assert proc.wait(timeout=60) == 0
    assert tiny_store.log("tiny", "qa")[0].step == tiny_store.log("tiny", "qa")[1].step + 1
    assert_repository_sound(repo)
