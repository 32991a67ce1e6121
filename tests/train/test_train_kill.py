"""SIGKILL `hyprstream lora train start` at random moments (loading, mid-step, mid-checkpoint):
after each kill `git fsck --full --strict` is clean, the branch tip is a complete checkpoint that
loads, its metrics cover steps 1..N exactly, and the next start resumes from that checkpoint.

12 kill points by default, 100 with HYPRSTREAM_LONG_TESTS=1; HYPRSTREAM_KILL_SEED picks the moments:
one kill in four during start-up, the others once the heartbeat shows 0-7 steps more than the last
checkpoint, plus 0-0.15 s (a checkpoint every 3 steps: about 40% of the time goes to writing and
committing checkpoints, so many kills land inside one).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from hyprstream_tui.engine.train import checkpoint as ckpt
from hyprstream_tui.engine.train.job import request_stop, train_status
from hyprstream_tui.store.locks import is_locked
from tests.helpers import REPO_ROOT
from tests.store.test_crash import assert_repository_sound
from tests.train.helpers import make_store

LONG = os.environ.get("HYPRSTREAM_LONG_TESTS") == "1"
KILLS = 100 if LONG else 12
SEED = int(os.environ.get("HYPRSTREAM_KILL_SEED", "4"))
WORKER = Path(__file__).with_name("train_worker.py")


class Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO_ROOT)
        assert self._read() == "ready"

    def _read(self) -> str:
        return self.proc.stdout.readline().strip()

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start(self, log: Path, *args: str) -> int:
        return int(self._ask(shlex.join(["start", str(log), *args])).split()[1])

    def wait(self, pid: int) -> int:
        return int(self._ask(f"wait {pid}").split()[1])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def wait_for_start(log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "from step" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.02)


def wait_for_step(store, step: int, timeout: float = 60) -> None:
    """Until the heartbeat (updated every quarter second) reports `step`: kill moments then follow
    the run's progress, however busy the machine is."""
    deadline = time.monotonic() + timeout
    while (train_status(store, "tiny", "qa").step or 0) < step:
        assert time.monotonic() < deadline, f"training did not reach step {step}"
        time.sleep(0.01)


def assert_tip_complete(store, model_dir: Path) -> int:
    """The tip's checkpoint loads (adapter into PEFT, optimizer state) and its metrics are 1..N."""
    from hyprstream_tui.engine.train.loop import load_base_model, peft_model

    tip = store.log("tiny", "qa")[0]
    if tip.kind != "checkpoint":
        return 0
    adapter_dir = store.snapshot("tiny", tip.sha, "adapter")
    peft_model(load_base_model(model_dir), adapter_dir, seed=0, trainable=False)
    saved = ckpt.load(store.snapshot("tiny", tip.sha))
    assert saved is not None and saved.state.step == tip.step and saved.optimizer
    lines = store.read_file("tiny", tip.sha, ckpt.METRICS_FILE).decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, tip.step + 1))
    return tip.step


def test_kill_9_during_training_keeps_every_tip_loadable(tmp_path, tiny_model_src):
    home = tmp_path / "home"
    store = make_store(home, tiny_model_src)
    model_dir = store.model_dir("tiny")
    uuid = store.resolve_adapter("tiny", "qa").uuid
    args = ["--home", str(home), "lora", "train", "start", "tiny:qa", "--steps", "100000", "--learning-rate", "1e-3",
            "--checkpoint-every", "3"]
    rng = random.Random(SEED)
    zygote = Zygote()
    resumed_from = []
    try:
        after = assert_tip_complete(store, model_dir)
        for i in range(KILLS):
            before = after
            log = tmp_path / f"run{i}.log"
            pid = zygote.start(log, *args)
            if i % 4:  # most kills once training runs (mid-step or mid-checkpoint), the rest while loading
                wait_for_start(log)
                wait_for_step(store, before + rng.randint(0, 7))
                time.sleep(rng.uniform(0.0, 0.15))
            else:
                time.sleep(rng.uniform(0.0, 0.5))
            os.kill(pid, signal.SIGKILL)
            assert zygote.wait(pid) == -signal.SIGKILL, log.read_text()
            assert not is_locked(store.train_lock_path("tiny", uuid))
            assert_repository_sound(model_dir)
            after = assert_tip_complete(store, model_dir)
            assert after >= before
            started = re.search(r"(?:Training|Resuming) qa on tiny from step (\d+)", log.read_text())
            if started:
                assert int(started.group(1)) == before, log.read_text()
                resumed_from.append(before)
        # Two last starts resume from the tip and stop cleanly: by Ctrl-C, and by `lora train stop`.
        for how in ("ctrl-c", "stop"):
            before = assert_tip_complete(store, model_dir)
            log = tmp_path / f"last-{how}.log"
            pid = zygote.start(log, *args)
            deadline = time.monotonic() + 60
            while (train_status(store, "tiny", "qa").step or 0) <= before and time.monotonic() < deadline:
                time.sleep(0.05)
            if how == "ctrl-c":
                os.kill(pid, signal.SIGINT)
            else:
                assert request_stop(store, "tiny", "qa", wait=60)
            assert zygote.wait(pid) == 0, log.read_text()
            text = log.read_text()
            assert f"from step {before} " in text and "Stopped qa at step" in text
            stopped_at = int(re.search(r"Stopped qa at step (\d+)", text).group(1))
            assert assert_tip_complete(store, model_dir) == stopped_at > before
            assert_repository_sound(model_dir)
    finally:
        zygote.close()
    assert len(resumed_from) >= KILLS * 3 // 4
    assert len(set(resumed_from)) >= KILLS // 3  # checkpoints were committed between kills
