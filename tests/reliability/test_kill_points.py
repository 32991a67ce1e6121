"""Issue 7, promise 1: nothing committed is ever lost, no repository is ever corrupt.

SIGKILL real `hyprstream` processes at random moments during `model import`, `model pull` (from the
fake hub, tests/hubserver.py), `lora train start` (checkpoints), `lora rollback`, `lora export` and
`lora merge`. After each kill: `git fsck --full --strict` and `git lfs fsck` clean on every model
repository, every branch tip loads (LFS objects present with the right sha256, every safetensors
file loads, a checkpoint holds the optimizer state of its step), every commit and ref committed
before the kill still there, and the next command works (no stale lock or half-built folder blocks it).

Kill moments: each command is first run once unkilled to measure its duration D, then each kill
comes after uniform(0, D) seconds (some runs finish first: they must have succeeded). Import and
pull alternate between a cold `python -m hyprstream_tui` and a fork of a warm zygote (kill_zygote.py)
so kills land in start-up and in the work itself; the other commands use the zygote.

32 kill points by default, 212 with HYPRSTREAM_LONG_TESTS=1. HYPRSTREAM_KILL_SEED picks the moments
(the seed is printed). Run with `-s` to see the summary line: kill points tried, how many landed
mid-command, and anything lost or corrupt (the test fails unless that is nothing).
(tests/store/test_crash.py kills in-process store writers; tests/train/test_train_kill.py kills
training on the heartbeat; this file covers every writing command through the CLI.)
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.reliability.kill_helpers import (LONG, StoreState, cold, garbage, git, leftovers, log_text, problems,
                                            zygote)

SEED = int(os.environ.get("HYPRSTREAM_KILL_SEED", "20261125"))
POINTS = {"import": 6, "pull": 6, "train": 6, "rollback": 7, "export": 4, "merge": 3}
if LONG:
    POINTS = {"import": 36, "pull": 36, "train": 40, "rollback": 40, "export": 36, "merge": 24}
HUB_REPO = "relorg/tiny-big"
TRAIN_ARGS = ("--learning-rate", "1e-3", "--max-seq-len", "64", "--batch-size", "2")


@dataclass
class Tally:
    points: Counter = field(default_factory=Counter)
    mid: Counter = field(default_factory=Counter)
    commits_seen: int = 0
    lost: list[str] = field(default_factory=list)  # lost or corrupt: the target is none
    garbage: Counter = field(default_factory=Counter)  # temp files a kill left where nothing reads them

    def line(self) -> str:
        per_op = ", ".join(f"{op} {self.points[op]} ({self.mid[op]} mid-command)" for op in POINTS if self.points[op])
        lost = "nothing" if not self.lost else f"{len(self.lost)}: {self.lost[:3]}"
        junk = ", ".join(f"{k} {v}" for k, v in sorted(self.garbage.items())) or "none"
        return (f"kill points (seed {SEED}{', long run' if LONG else ''}): {sum(self.points.values())} tried, "
                f"{sum(self.mid.values())} mid-command [{per_op}]; {self.commits_seen} commits checked; "
                f"lost or corrupt: {lost}; harmless temp files left by kills: {junk}")


@pytest.fixture(scope="module", autouse=True)
def tally():
    """This module's kill points, summed up in one line at its end (run with -s to see it)."""
    print(f"\nkill-point seed: {SEED} (set HYPRSTREAM_KILL_SEED to replay)")
    counted = Tally()
    yield counted
    print("\n" + counted.line())


def rng_for(op: str) -> random.Random:
    return random.Random(f"{SEED}-{op}")


# ---- one kill point -------------------------------------------------------------------------------
def proc_alive(pid: int) -> bool:
    """Running (not exited, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


class Launch:
    """A started command, cold or forked, that can be killed and reaped the same way."""

    def __init__(self, home: Path, log: Path, args: tuple[str, ...], *, warm: bool, env: dict | None = None):
        self.log, self.warm = log, warm
        if warm:
            self.pid = zygote().start(home, log, *args, env=env)
            self.proc = None
        else:
            self.proc = cold(home, log, "--home", str(home), *args, env=env)
            self.pid = self.proc.pid

    def wait(self) -> int:
        return zygote().wait(self.pid) if self.warm else self.proc.wait(timeout=300)

    def kill_after(self, delay: float) -> tuple[bool, int]:
        """SIGKILL after `delay` s; (was it still running, its exit code)."""
        time.sleep(delay)
        alive = proc_alive(self.pid)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return alive, self.wait()


def run_ok(home: Path, log: Path, *args: str, warm: bool = True, env: dict | None = None) -> float:
    """Run a command to the end; it must succeed. Returns its duration."""
    if warm:
        zygote()  # started before the clock: its start-up is not the command's
    t0 = time.monotonic()
    code = Launch(home, log, args, warm=warm, env=env).wait()
    assert code == 0, f"hyprstream {' '.join(args)} failed ({code}):\n{log_text(log)}"
    return time.monotonic() - t0


def kill_point(tally: Tally, op: str, home: Path, log: Path, args: tuple[str, ...], delay: float, *,
               warm: bool = True, env: dict | None = None) -> bool:
    """Start `args`, SIGKILL it after `delay` s, check the store. True if it was killed mid-command."""
    before = StoreState.capture(home)
    _alive, code = Launch(home, log, args, warm=warm, env=env).kill_after(delay)
    tally.points[op] += 1
    killed = code == -signal.SIGKILL  # else it finished first (perhaps a hair before the kill)
    tally.mid[op] += killed
    assert killed or code == 0, f"{op} failed on its own before the kill ({code}):\n{log_text(log)}"
    found = problems(home, before, lfs_fsck=False)
    tally.commits_seen += before.commits()
    tally.lost += [f"{op} after {delay:.3f} s: {p}" for p in found]
    assert not found, f"{op} killed after {delay:.3f} s (seed {SEED}):\n" + "\n".join(found)
    return killed


def count_garbage(tally: Tally, home: Path) -> None:
    """At the end of the last kill test of a home: what its kills left that nothing reads."""
    for kind, n in garbage(home).items():
        tally.garbage[kind] += n


def assert_clean(home: Path) -> None:
    left = leftovers(home)
    assert not left, f"left behind after the next command: {left}"


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_src(tmp_path_factory, tiny_model_src) -> Path:
    """The tiny model plus a 24 MB extra shard: imports and pulls take long enough to be cut."""
    src = tmp_path_factory.mktemp("reliability-src") / "tinybig"
    shutil.copytree(tiny_model_src, src)
    save_file({"extra": np.random.default_rng(7).random((1536, 4096), dtype=np.float32)}, str(src / "extra.safetensors"))
    return src


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_src):
    """A home with model `tiny` and adapter `qa` (4 samples), trained 4 steps: 2 checkpoints.
    Shared, in order, by the train, rollback, export and merge kill tests."""
    from tests.train.helpers import make_store

    home = tmp_path_factory.mktemp("reliability-adapters") / "home"
    make_store(home, tiny_model_src)
    logs = home.parent / "logs"
    logs.mkdir()
    run_ok(home, logs / "setup.log", "lora", "train", "start", "tiny:qa", "--steps", "4", "--checkpoint-every", "2",
           *TRAIN_ARGS)
    assert not problems(home)
    return home, logs


def remove_model(home: Path, name: str) -> None:
    """Between kill points, in this process (not what is under test)."""
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    Store(Paths.from_env(home)).remove_model(name)


def adapter_log(home: Path) -> list[tuple[str, str]]:
    """(sha, subject) of the adapter branch, newest first."""
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    return [(c.sha, c.summary) for c in store.log("tiny", "qa")]


def tip_step(home: Path) -> int:
    for _sha, summary in adapter_log(home):
        m = re.search(r"step (\d+)", summary)
        if m:
            return int(m.group(1))
    return 0


def adapter_branch(home: Path) -> str:
    return git(home / "models" / "tiny", "for-each-ref", "--format=%(refname)", "refs/heads/adapter").stdout.split()[0]


# ---- the commands -----------------------------------------------------------------------------------
def test_kill_during_model_import(tally, big_src, tmp_path):
    home, rng = tmp_path / "home", rng_for("import")
    args = ("model", "import", str(big_src), "--name", "imp")
    durations = {}
    for warm in (False, True):  # measure a clean run of each kind
        durations[warm] = run_ok(home, tmp_path / f"calib-{warm}.log", *args, warm=warm)
        assert not problems(home)
        remove_model(home, "imp")
    print(f"import takes {durations[False]:.2f} s cold, {durations[True]:.2f} s forked")
    for i in range(POINTS["import"]):
        warm = bool(i % 2)
        log = tmp_path / f"kill{i}.log"
        kill_point(tally, "import", home, log, args, rng.uniform(0, durations[warm]), warm=warm)
        model = home / "models" / "imp"
        if model.exists():  # renamed into place: complete (checked above), and a second import is refused
            again = Launch(home, tmp_path / "again.log", args, warm=True).wait()
            assert again != 0 and "exists already" in log_text(tmp_path / "again.log")
        else:  # the next import works, and sweeps what the killed one left
            run_ok(home, tmp_path / "next.log", *args)
        assert not problems(home)
        assert_clean(home)
        assert (model / "extra.safetensors").read_bytes() == (big_src / "extra.safetensors").read_bytes()
        remove_model(home, "imp")
    count_garbage(tally, home)


@pytest.fixture
def hub(tmp_path, big_src):
    from tests.hubserver import FakeHub

    with FakeHub() as server:
        server.add_repo(HUB_REPO, big_src)
        yield server


def test_kill_during_model_pull(tally, hub, big_src, tmp_path):
    """Pairs of kill points share a Hugging Face cache, so the second of a pair may resume a
    download the first was killed in."""
    home, rng = tmp_path / "home", rng_for("pull")
    args = ("model", "pull", HUB_REPO, "--name", "pulled")

    def env(i: int) -> dict[str, str]:
        return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / f"hf-{i}"), "HF_HUB_OFFLINE": "0"}

    durations = {}
    for warm in (False, True):
        durations[warm] = run_ok(home, tmp_path / f"calib-{warm}.log", *args, warm=warm, env=env(-1 - warm))
        assert not problems(home)
        remove_model(home, "pulled")
    for i in range(POINTS["pull"]):
        warm = bool(i % 2)
        kill_point(tally, "pull", home, tmp_path / f"kill{i}.log", args, rng.uniform(0, durations[warm]), warm=warm,
                   env=env(i // 2))
        model = home / "models" / "pulled"
        if not model.exists():
            run_ok(home, tmp_path / "next.log", *args, env=env(i // 2))
        assert not problems(home)
        assert_clean(home)
        assert (model / "extra.safetensors").read_bytes() == (big_src / "extra.safetensors").read_bytes()
        assert "source: hf://" + HUB_REPO in git(model, "log", "-1", "--format=%B", "main").stdout
        remove_model(home, "pulled")
    count_garbage(tally, home)


def test_kill_during_training_checkpoints(tally, trained):
    """`lora train start --steps 6 --checkpoint-every 2 --new-run`: three checkpoints per run;
    every kill leaves the last committed one as the tip, and the next start trains from it."""
    home, logs = trained
    rng = rng_for("train")
    args = ("lora", "train", "start", "tiny:qa", "--steps", "6", "--checkpoint-every", "2", "--new-run", *TRAIN_ARGS)
    duration = run_ok(home, logs / "train-calib.log", *args)
    for i in range(POINTS["train"]):
        step = tip_step(home)
        log = logs / f"train-kill{i}.log"
        kill_point(tally, "train", home, log, args, rng.uniform(0, duration))
        started = re.search(r"(?:Training|Resuming) qa on tiny from step (\d+)", log_text(log))
        if started:  # the previous kill's survivor was the starting point
            assert int(started.group(1)) == step, log_text(log)
        assert tip_step(home) >= step
    step = tip_step(home)
    run_ok(home, logs / "train-last.log", *args)
    assert f"from step {step} " in log_text(logs / "train-last.log")
    assert tip_step(home) == step + 6
    assert not problems(home)
    assert_clean(home)


def test_kill_during_rollback(tally, trained):
    home, logs = trained
    rng = rng_for("rollback")
    repo = home / "models" / "tiny"
    branch = adapter_branch(home)

    def checkpoints() -> list[int]:
        return sorted({int(m.group(1)) for _s, subj in adapter_log(home) if (m := re.fullmatch(r"Checkpoint at step (\d+)", subj))})

    def tree(rev: str) -> str:
        return git(repo, "rev-parse", f"{rev}^{{tree}}").stdout.strip()

    target = checkpoints()[0]
    duration = run_ok(home, logs / "rb-calib.log", "lora", "rollback", "tiny:qa", f"step:{target}")
    for i in range(POINTS["rollback"]):
        target = rng.choice(checkpoints())
        target_sha = git(repo, "log", "--format=%H", f"--grep=^Checkpoint at step {target}$", branch).stdout.split()[0]
        old_tip = git(repo, "rev-parse", branch).stdout.strip()
        args = ("lora", "rollback", "tiny:qa", f"step:{target}")
        kill_point(tally, "rollback", home, logs / f"rb-kill{i}.log", args, rng.uniform(0, duration))
        tip = git(repo, "rev-parse", branch).stdout.strip()
        assert tip == old_tip or (tree(tip) == tree(target_sha) and git(repo, "rev-parse", f"{tip}^").stdout.strip() == old_tip)
        run_ok(home, logs / "rb-next.log", *args)  # the next command works, and leaves the worktree at the tip
        assert tree(branch) == tree(target_sha)
        worktree = home / "models" / "working" / branch.rsplit("/", 1)[1]
        for rel in ("adapter/adapter_model.safetensors", "optimizer/state.safetensors"):
            blob = git(repo, "cat-file", "blob", f"{branch}:{rel}").stdout
            oid = re.search(r"oid sha256:([0-9a-f]{64})", blob).group(1)
            assert os.path.samefile(worktree / rel, repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid)
    assert not problems(home)
    assert_clean(home)


def test_kill_during_export(tally, trained, tmp_path):
    """Both formats, each replacing an earlier export (--force): the output is never half a file."""
    from safetensors import safe_open

    home, logs = trained
    rng = rng_for("export")
    out = {"safetensors": tmp_path / "out" / "qa.safetensors", "peft": tmp_path / "out" / "qa-peft"}
    out["peft"].parent.mkdir()

    def args(fmt: str) -> tuple[str, ...]:
        return ("lora", "export", "tiny:qa", "--format", fmt, "--output", str(out[fmt]), "--force")

    def assert_loads(fmt: str) -> None:
        weights = out[fmt] if fmt == "safetensors" else out[fmt] / "adapter_model.safetensors"
        if fmt == "peft" and out[fmt].exists():
            assert (out[fmt] / "adapter_config.json").is_file() and weights.is_file(), list(out[fmt].iterdir())
        if weights.exists():
            with safe_open(str(weights), framework="pt") as fh:
                assert fh.metadata()["base_model"] == "tiny" and list(fh.keys())

    durations = {fmt: run_ok(home, logs / f"export-calib-{fmt}.log", *args(fmt)) for fmt in out}
    for i in range(POINTS["export"]):
        fmt = ("safetensors", "peft")[i % 2]
        kill_point(tally, "export", home, logs / f"export-kill{i}.log", args(fmt), rng.uniform(0, durations[fmt]))
        assert_loads(fmt)
        run_ok(home, logs / "export-next.log", *args(fmt))
        assert_loads(fmt)
    tally.garbage["export temp files"] += len([p for p in out["peft"].parent.iterdir() if ".incomplete" in p.name])
    assert_clean(home)


def test_kill_during_merge(tally, trained):
    home, logs = trained
    rng = rng_for("merge")
    args = ("lora", "merge", "tiny:qa", "--name", "merged")
    duration = run_ok(home, logs / "merge-calib.log", *args)
    remove_model(home, "merged")
    for i in range(POINTS["merge"]):
        kill_point(tally, "merge", home, logs / f"merge-kill{i}.log", args, rng.uniform(0, duration))
        if not (home / "models" / "merged").exists():
            run_ok(home, logs / "merge-next.log", *args)
            assert not list((home / "cache").glob("merge-*")), "the next merge did not sweep the killed one's folder"
        assert not problems(home)
        assert_clean(home)
        assert "adapter-commit: " in git(home / "models" / "merged", "log", "-1", "--format=%B", "main").stdout
        remove_model(home, "merged")
    count_garbage(tally, home)


def test_the_next_merge_sweeps_what_a_killed_merge_left(trained):
    """A merge killed before its import leaves `cache/merge-<name>-<id>`, a whole model's size; the
    next `lora merge` removes it (it used to stay forever), and never one a running merge holds."""
    from hyprstream_tui.store.locks import locked

    home, logs = trained
    left = home / "cache" / "merge-merged-0badc0de"
    busy = home / "cache" / "merge-other-0badc0de"
    for folder in (left, busy):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    with locked(home / "locks" / "merge-other.lock", "a merge into other"):  # a merge into `other` runs
        run_ok(home, logs / "merge-sweep.log", "lora", "merge", "tiny:qa", "--name", "merged")
    assert not left.exists() and busy.exists()
    shutil.rmtree(busy)
    remove_model(home, "merged")


def test_a_stale_worktree_index_lock_does_not_block_the_next_start(trained):
    """A kill inside libgit2's index write (at a train start, or as a rollback resets the worktree)
    leaves `index.lock` in the worktree's git folder. The next `lora train start` clears it; it used
    to fail with "the index is locked" until some other command took the model's lock."""
    home, logs = trained
    uuid = adapter_branch(home).rsplit("/", 1)[1]
    lock = home / "models" / "tiny" / ".git" / "worktrees" / f"adapter-{uuid}" / "index.lock"
    lock.write_bytes(b"")  # exactly what the killed writer leaves
    step = tip_step(home)
    run_ok(home, logs / "stale-index-lock.log", "lora", "train", "start", "tiny:qa", "--steps", "1",
           "--checkpoint-every", "1", "--new-run", *TRAIN_ARGS)
    assert tip_step(home) == step + 1 and not lock.exists()
    assert not problems(home)


def test_a_peft_export_is_never_half_replaced(trained, tmp_path, monkeypatch):
    """`lora export --format peft --force` over an earlier export, stopped (Ctrl-C here) while the
    earlier one is being removed: the output folder is the old export or the new one, whole. (It
    used to be removed in place, so a kill or Ctrl-C there left a folder with one of its two files.)"""
    from hyprstream_tui.engine.train import export
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    home, _logs = trained
    store = Store(Paths.from_env(home))
    output = tmp_path / "qa-peft"
    export.export_adapter(store, "tiny", "qa", output, fmt="peft")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):  # removes one file, then Ctrl-C
        files = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else []
        if not files:
            return real_rmtree(path, *args, **kwargs)
        files[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(export.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        export.export_adapter(store, "tiny", "qa", output, fmt="peft", force=True)
    monkeypatch.setattr(export.shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in output.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    export.export_adapter(store, "tiny", "qa", output, fmt="peft", force=True)  # and the next one works
    assert sorted(p.name for p in output.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_enough_kill_points():
    """The promise's floor, in the plan the kill tests above run (each asserts that its kill points
    lost nothing): 30 kill points by default, 200 in the long run, every writing command killed."""
    assert sum(POINTS.values()) >= (200 if LONG else 30), POINTS
    assert all(n > 0 for n in POINTS.values()), POINTS
