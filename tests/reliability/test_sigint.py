"""Issue 7, promise 6: Ctrl-C is always safe.

SIGINT (what Ctrl-C sends) to real `hyprstream` processes during start-up, `model import`,
`model pull` (from the fake hub, slowed down so that the signal lands mid-download) and
`lora train start`: the process exits within 5 s with one clear line and no traceback, and the last
complete state is intact: `git fsck --full --strict` clean, no half model, every checkpoint committed
before still there (the tip loads), no temp leftovers that block the next run, and the next run works
(a pull resumes its partial download).

Moments: one when the work is visibly under way (the half-built repository exists, the partial
download has bytes, training has passed its tip), plus seeded random ones over the command's
measured duration (HYPRSTREAM_KILL_SEED; the seed is printed), from the moment Python has reached
hyprstream's code: in the interpreter's own start-up (site imports) nothing can turn a Ctrl-C into
one line, and nothing has been written then.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.reliability.kill_helpers import (LONG, StoreState, child_env, cold, leftovers, log_text, problems, wait_for,
                                            zygote)

SEED = int(os.environ.get("HYPRSTREAM_KILL_SEED", "20261125"))
EXIT_S = 5.0
RANDOM_MOMENTS = 12 if LONG else 2
INTERRUPTED = re.compile(r"error: interrupted[^\n]*")
HUB_REPO = "sigorg/tiny-big"
TRAIN_ARGS = ("--learning-rate", "1e-3", "--max-seq-len", "64", "--batch-size", "2")


@pytest.fixture(scope="module", autouse=True)
def _seed():
    print(f"\nCtrl-C seed: {SEED} (set HYPRSTREAM_KILL_SEED to replay)")


def rng_for(name: str) -> random.Random:
    return random.Random(f"{SEED}-sigint-{name}")


def interrupt_cold(proc: subprocess.Popen, *, times: int = 1, gap: float = 0.0) -> tuple[int, float]:
    """SIGINT `proc` (`times` signals, `gap` s apart); (exit code, seconds from the first signal to the exit)."""
    t0 = time.monotonic()
    for i in range(times):
        if i:
            time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("still running 30 s after Ctrl-C") from None
    return code, time.monotonic() - t0


def interrupt_forked(pid: int, *, times: int = 1, gap: float = 0.0) -> tuple[int, float]:
    t0 = time.monotonic()
    watchdog = threading.Timer(30, lambda: os.kill(pid, signal.SIGKILL))
    watchdog.start()
    try:
        for i in range(times):
            if i:
                time.sleep(gap)
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        code = zygote().wait(pid)
    finally:
        watchdog.cancel()
    assert code != -signal.SIGKILL, "still running 30 s after Ctrl-C"
    return code, time.monotonic() - t0


def assert_clear_exit(log: Path, code: int, seconds: float, done: re.Pattern) -> bool:
    """Exited in time with one clear last line and no traceback. True if it was interrupted
    (False: it finished its work first)."""
    text = log_text(log)
    assert seconds <= EXIT_S, f"took {seconds:.1f} s to exit after Ctrl-C:\n{text}"
    assert "Traceback" not in text and "Exception ignored" not in text and "KeyboardInterrupt" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, f"exit {code} without a word"
    errors = [line for line in lines if line.startswith("error:")]
    if code == -signal.SIGINT:  # the signal came while Python was exiting (its own handler gone): the
        code = 0 if done.search(lines[-1]) else 130  # last line says how the command ended
    if code == 0:
        assert not errors and done.search(lines[-1]), text
        return False
    assert code == 130 and INTERRUPTED.fullmatch(lines[-1]) and errors == lines[-1:], text
    return True


def assert_sound(home: Path, before: StoreState) -> None:
    found = problems(home, before)
    assert not found, "\n".join(found)
    assert not leftovers(home), leftovers(home)


# ---- start-up -------------------------------------------------------------------------------------
def startup_time() -> float:
    """How long, on this machine now, a cold Python takes to reach hyprstream's own code."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import hyprstream_tui"], check=True, env=child_env(Path("/nonexistent")))
    return time.monotonic() - t0


def random_moment(rng: random.Random, duration: float) -> float:
    """A moment in a cold command's run, once Python has started and reached hyprstream's code.
    (Before that, in the interpreter's own start-up, a Ctrl-C gives Python's traceback whatever a
    program does; nothing has been written then.)"""
    start = 1.5 * startup_time()
    return rng.uniform(start, max(duration, start + 0.1))


def test_ctrl_c_during_start_up_is_one_line(tmp_path, tiny_model_src):
    """Ctrl-C while the CLI imports its modules and builds its parser (the first half second of any
    command): one line, nothing written, not a KeyboardInterrupt traceback."""
    home = tmp_path / "home"
    rng = rng_for("startup")
    reach = startup_time()
    cases = [("model", "import", str(tiny_model_src), "--name", "tiny"), ("model", "list"), ("lora", "list")]
    for i in range(6 if not LONG else 30):
        args = cases[i % len(cases)]
        log = tmp_path / f"start{i}.log"
        proc = cold(home, log, *args)
        time.sleep(reach * 1.5 + rng.uniform(0, 0.5))
        code, seconds = interrupt_cold(proc)
        done = re.compile(r"Imported tiny|No models yet|No adapters yet|tiny")
        assert_clear_exit(log, code, seconds, done)
        assert not leftovers(home)
        shutil.rmtree(home, ignore_errors=True)


# ---- import -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_src(tmp_path_factory, tiny_model_src) -> Path:
    src = tmp_path_factory.mktemp("sigint-src") / "tinybig"
    shutil.copytree(tiny_model_src, src)
    save_file({"extra": np.random.default_rng(8).random((2048, 4096), dtype=np.float32)}, str(src / "extra.safetensors"))
    return src


def test_ctrl_c_during_import_leaves_no_half_model(tmp_path, big_src):
    home = tmp_path / "home"
    rng = rng_for("import")
    args = ("--home", str(home), "model", "import", str(big_src), "--name", "imp")
    t0 = time.monotonic()
    assert cold(home, tmp_path / "calib.log", *args).wait() == 0
    duration = time.monotonic() - t0
    shutil.rmtree(home / "models" / "imp")
    interrupted = 0
    for i in range(1 + RANDOM_MOMENTS):
        log = tmp_path / f"imp{i}.log"
        before = StoreState.capture(home)
        delay = random_moment(rng, duration)
        proc = cold(home, log, *args)
        if i == 0:  # once the half-built repository is there
            wait_for(lambda: any(p.name.startswith(".import-imp-") for p in (home / "models").glob(".import-*"))
                     or proc.poll() is not None, 60, "the import to begin")
        else:
            time.sleep(delay)
        code, seconds = interrupt_cold(proc)
        cut = assert_clear_exit(log, code, seconds, re.compile(r"Imported imp"))
        interrupted += cut
        assert_sound(home, before)  # before any other command runs: nothing half, nothing left
        model = home / "models" / "imp"
        if not cut:
            assert model.is_dir()
        elif model.exists():
            # Ctrl-C after the import's last step (the rename into place) and before its "Imported"
            # line: the whole model was kept, as the interrupted line says ("what was complete is kept").
            pass
        else:
            assert zygote().run(home, tmp_path / "next.log", *args[2:]) == 0, log_text(tmp_path / "next.log")
        assert (model / "extra.safetensors").read_bytes() == (big_src / "extra.safetensors").read_bytes()
        assert_sound(home, before)
        shutil.rmtree(model)
    assert interrupted >= 1


# ---- pull -------------------------------------------------------------------------------------------
class _Throttled:
    """A socket file that sends at most `rate` bytes a second: a download long enough to cut."""

    def __init__(self, raw, rate: float) -> None:
        self.raw, self.rate = raw, rate

    def write(self, data) -> int:
        time.sleep(len(data) / self.rate)
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


@pytest.fixture
def slow_hub(big_src, monkeypatch):
    from tests import hubserver

    original = hubserver._Handler._send

    def send(self, *args, **kwargs):
        raw = self.wfile
        self.wfile = _Throttled(raw, 32 << 20)  # 32 MB/s: the 32 MB shard takes about a second
        try:
            return original(self, *args, **kwargs)
        finally:
            self.wfile = raw

    monkeypatch.setattr(hubserver._Handler, "_send", send)
    with hubserver.FakeHub() as hub:
        hub.add_repo(HUB_REPO, big_src)
        yield hub


def test_ctrl_c_during_pull_keeps_the_partial_download_and_no_half_model(tmp_path, slow_hub, big_src):
    home = tmp_path / "home"
    rng = rng_for("pull")
    hf_home = tmp_path / "hf"
    env = {"HF_ENDPOINT": slow_hub.url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0"}
    args = ("--home", str(home), "model", "pull", HUB_REPO, "--name", "pulled")
    size = (big_src / "extra.safetensors").stat().st_size
    t0 = time.monotonic()
    assert cold(home, tmp_path / "calib.log", *args, env={**env, "HF_HOME": str(tmp_path / "hf-calib")}).wait() == 0
    duration = time.monotonic() - t0
    shutil.rmtree(home / "models" / "pulled")
    interrupted = 0
    for i in range(1 + RANDOM_MOMENTS):
        shutil.rmtree(hf_home, ignore_errors=True)  # every pull downloads
        served = slow_hub.bytes_served("extra.safetensors")
        log = tmp_path / f"pull{i}.log"
        before = StoreState.capture(home)
        delay = random_moment(rng, duration)
        proc = cold(home, log, *args, env=env)
        if i == 0:  # mid-download: the partial file holds a megabyte or more
            def partial() -> int:
                return sum(p.stat().st_size for p in hf_home.rglob("*.incomplete") if p.is_file())
            wait_for(lambda: partial() >= 1 << 20 or proc.poll() is not None, 60, "the download to begin")
        else:
            time.sleep(delay)
        code, seconds = interrupt_cold(proc)
        cut = assert_clear_exit(log, code, seconds, re.compile(r"Pulled .* as pulled"))
        interrupted += cut
        assert_sound(home, before)
        model = home / "models" / "pulled"
        if not cut:
            assert model.is_dir()
        else:
            assert not model.exists()
            assert zygote().run(home, tmp_path / "next.log", *args[2:], env=env) == 0, log_text(tmp_path / "next.log")
            if i == 0:  # it went on from the partial file, not from zero
                assert slow_hub.bytes_served("extra.safetensors") - served < 2 * size
                assert any(h.range for h in slow_hub.file_hits("extra.safetensors"))
        assert (model / "extra.safetensors").read_bytes() == (big_src / "extra.safetensors").read_bytes()
        assert_sound(home, before)
        shutil.rmtree(model)
    assert interrupted >= 1


# ---- training ----------------------------------------------------------------------------------------
@pytest.fixture
def trained_once(tmp_path, tiny_model_src):
    """Model `tiny`, adapter `qa` with 4 samples, trained 2 steps: one checkpoint."""
    from tests.train.helpers import make_store

    home = tmp_path / "home"
    make_store(home, tiny_model_src)
    log = tmp_path / "setup.log"
    assert zygote().run(home, log, "lora", "train", "start", "tiny:qa", "--steps", "2", "--checkpoint-every", "2",
                        *TRAIN_ARGS) == 0, log_text(log)
    return home


def is_locked(path: Path) -> bool:
    from hyprstream_tui.store.locks import is_locked as held

    return held(path)


def heartbeat_step(home: Path) -> int:
    from hyprstream_tui.engine.train.job import train_status
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return train_status(Store(Paths.from_env(home)), "tiny", "qa").step or 0


def tip(home: Path) -> tuple[str, int]:
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    top = Store(Paths.from_env(home)).log("tiny", "qa")[0]
    return top.sha, top.step or 0


def test_ctrl_c_during_training_commits_or_keeps_the_last_checkpoint(tmp_path, trained_once):
    """One Ctrl-C: the step finishes, a checkpoint is committed, exit 0 with "Stopped ... at step N".
    Two quick Ctrl-Cs (or one while loading): out at once, the last committed checkpoint is the tip."""
    home = trained_once
    rng = rng_for("train")
    args = ("lora", "train", "start", "tiny:qa", "--steps", "500", "--checkpoint-every", "3", "--new-run", *TRAIN_ARGS)
    stopped = re.compile(r"Stopped qa at step (\d+): checkpoint ([0-9a-f]{7})")
    cases = ["once-training", "twice", "once-loading"] + [rng.choice(["once-training", "twice"]) for _ in range(RANDOM_MOMENTS - 3)]
    for i, case in enumerate(cases):
        before = StoreState.capture(home)
        sha0, step0 = tip(home)
        log = tmp_path / f"train{i}-{case}.log"
        pid = zygote().start(home, log, *args)
        if case == "once-loading":
            wait_for(lambda: any(is_locked(p) for p in (home / "locks").glob("train-*.lock")), 60, "the train lock")
            time.sleep(rng.uniform(0, 0.2))
        else:
            wait_for(lambda: heartbeat_step(home) >= step0 + rng.randint(1, 4), 120, "training steps", every=0.02)
            time.sleep(rng.uniform(0, 0.1))
        code, seconds = interrupt_forked(pid, times=2 if case == "twice" else 1, gap=rng.uniform(0.0, 0.3))
        text = log_text(log)
        cut = assert_clear_exit(log, code, seconds, stopped)
        assert_sound(home, before)
        sha, step = tip(home)
        if not cut:  # stopped cleanly: the last step it reached is the tip's checkpoint
            m = stopped.search(text)
            assert int(m.group(1)) == step and sha.startswith(m.group(2)), text
            assert step >= step0
        else:
            assert step >= step0  # the previous checkpoint, or one committed in between
        if case == "once-training":
            assert not cut and step > step0, text
    # the next start trains on from the tip
    sha, step = tip(home)
    log = tmp_path / "train-next.log"
    assert zygote().run(home, log, "lora", "train", "start", "tiny:qa", "--steps", "2", "--checkpoint-every", "2",
                        "--new-run", *TRAIN_ARGS) == 0, log_text(log)
    assert f"from step {step} " in log_text(log) and tip(home)[1] == step + 2
    assert_sound(home, StoreState.capture(home))


# ---- where Python itself would lose the Ctrl-C (both met by the random moments above) ------------
def test_a_ctrl_c_python_would_drop_is_delivered_again(tmp_path):
    """A KeyboardInterrupt raised inside a `__del__` (pygit2's Config.__del__ here, in the long run)
    is printed as "Exception ignored" and dropped: the command ran on. While a command runs it is
    delivered again."""
    script = (
        "import time\n"
        "from hyprstream_tui import interrupt\n"
        "class Dropped:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt  # what a Ctrl-C landing in a __del__ is\n"
        "with interrupt.redelivered():\n"
        "    try:\n"
        "        Dropped()\n"
        "        for _ in range(200):\n"
        "            time.sleep(0.01)\n"
        "        print('ran on')\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted')\n"
    )
    # Started as from a terminal: SIGINT at its default, whatever this test run inherited (a run
    # started in the background by a non-interactive shell has SIGINT ignored, and a child that
    # inherits that has no Ctrl-C to deliver at all).
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=child_env(tmp_path),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert out.stdout.strip() == "interrupted" and "Exception ignored" not in out.stderr, out


def test_a_ctrl_c_wrapped_by_a_library_is_one_line(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt inside huggingface_hub's lazy import came back as "RuntimeError: Error
    calling __set_name__ ..." with two tracebacks; it is an interrupt like any other."""
    from hyprstream_tui import cli

    def wrapped(_args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance 'name'") from exc

    monkeypatch.setattr(cli.models, "cmd_model_list", wrapped)
    assert cli.main(["--home", str(tmp_path), "model", "list"]) == 130
    assert capsys.readouterr().err == "error: interrupted; what was complete is kept.\n"
