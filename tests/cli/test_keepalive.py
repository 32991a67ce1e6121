"""The keep-alive engine (engine/keepalive*.py, cli/engine.py): real `hyprstream` processes and
real engine processes, with the keep-alive turned on (the rest of the suite runs without it).

Every engine process a test starts is looked up by its command line (its --home lies under the
test's tmp_path) and must be gone when the test ends: the `engines` fixture stops what is left,
kills what does not stop, and checks.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyprstream_tui.engine.keepalive_client import RESTARTED, absolute_spec
from hyprstream_tui.engine.keepalive_protocol import (
    DEFAULT_KEEP_ALIVE_S,
    MAX_SOCKET_PATH,
    EngineFiles,
    keep_alive_seconds,
    socket_path,
)
from hyprstream_tui.errors import InvalidInput
from hyprstream_tui.settings import Paths
from hyprstream_tui.store.locks import is_locked
from tests.helpers import REPO_ROOT, assert_one_line_error

KEEP = {"HYPRSTREAM_KEEP_ALIVE": "60"}
INFER = ("infer", "tiny", "--prompt", "Hello", "--temperature", "0", "--max-tokens", "8")
# A tiny model whose reply never ends before --max-tokens (its end-of-text token is one greedy
# decoding never picks): seconds of streaming, to stop or kill the engine in the middle of.
LONG = ("infer", "long", "--raw", "--prompt", "Once upon a time", "--temperature", "0",
        "--max-tokens", "3500")


def engine_pids(under: Path) -> list[int]:
    """Live engine processes whose --home lies under `under` (a zombie has no command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "hyprstream_tui.engine.keepalive" in argv and any(a.startswith(str(under)) for a in argv):
            found.append(int(entry.name))
    return found


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def engines(tmp_path):
    """Finalizer: every engine process of this test is gone at its end."""
    yield tmp_path
    left = engine_pids(tmp_path)
    for pid in left:
        os.kill(pid, signal.SIGTERM)  # an engine stops cleanly on SIGTERM
    if not wait_for(lambda: not engine_pids(tmp_path), 15):
        for pid in engine_pids(tmp_path):
            os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not engine_pids(tmp_path), 10), engine_pids(tmp_path)


@pytest.fixture
def ka(tiny_store, engines):
    """A home holding the tiny model as `tiny`, with engine processes cleaned up after."""
    return tiny_store.paths.home


@pytest.fixture(scope="module")
def long_src(tmp_path_factory) -> Path:
    from hyprstream_tui.engine.tiny import build_tiny_model

    src = build_tiny_model(tmp_path_factory.mktemp("long") / "long", arch="qwen2", seed=1,
                           max_position_embeddings=4096)
    for name, key, value in (("generation_config.json", "eos_token_id", [1]),
                             ("config.json", "eos_token_id", 1),
                             ("tokenizer_config.json", "eos_token", "<|im_start|>")):
        data = json.loads((src / name).read_text())
        data[key] = value
        (src / name).write_text(json.dumps(data))
    return src


def popen_cli(home: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    full_env = {**os.environ, "HYPRSTREAM_HOME": str(home), "COLUMNS": "200", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "hyprstream_tui", *args], env=full_env,
                            cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)


def status(cli) -> dict:
    result = cli("engine", "status", "--json")
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def infer_json(cli, *extra: str, env: dict = KEEP) -> dict:
    result = cli(*INFER, "--json", *extra, env=env)
    assert result.returncode == 0, result
    assert result.stderr == "", result.stderr
    return json.loads(result.stdout)


# ---- the warm path ----------------------------------------------------------------------------
def test_second_infer_reuses_the_engine_and_answers_as_in_process(ka, cli):
    first = infer_json(cli)
    assert first["timings"]["load_s"] > 0  # the engine process loaded it (ModelLoaded)
    pid = status(cli)["pid"]
    second = infer_json(cli)
    assert second["timings"]["load_s"] == 0  # no ModelLoaded: it was loaded already
    assert status(cli)["pid"] == pid and engine_pids(ka) == [pid]
    local = infer_json(cli, "--no-keep-alive")  # today's in-process engine, greedy: the same text
    assert first["text"] == second["text"] == local["text"] and first["usage"] == local["usage"]
    assert first["provenance"]["model_commit"] == local["provenance"]["model_commit"]


def test_status_reports_the_engine_and_its_socket_is_private(ka, cli):
    assert cli(*INFER, env={"HYPRSTREAM_KEEP_ALIVE": "7m"}).returncode == 0
    info = status(cli)
    assert info["running"] and info["keep_alive_s"] == 420
    assert [(m["name"], m["device"]) for m in info["models"]] == [("tiny", "cpu")]
    sock = Path(info["socket"])
    assert sock == socket_path(ka) and stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    text = cli("engine", "status").stdout
    assert f"Engine process {info['pid']}" in text and "stops after 7m00s idle" in text
    assert "loaded: tiny" in text and str(Path(info["log"])) in text
    assert Path(info["log"]) == ka / "logs" / "keepalive.log"


def test_chat_and_options_travel_with_each_request(ka, cli):
    result = cli("chat", "tiny", "--temperature", "0", "--max-tokens", "6", "--dtype", "float32",
                 "--threads", "1", input="Hello\n/exit\n", env=KEEP)
    assert result.returncode == 0, result
    assert "assistant> " in result.stdout and result.stderr == ""
    pid = status(cli)["pid"]
    again = infer_json(cli, "--dtype", "float32")  # the chat's float32 model: loaded already
    assert again["timings"]["load_s"] == 0 and again["provenance"]["dtype"] == "float32"
    other = infer_json(cli, "--dtype", "bfloat16")  # other options: another model in the engine
    assert other["timings"]["load_s"] > 0 and other["provenance"]["dtype"] == "bfloat16"
    info = status(cli)
    assert info["pid"] == pid and sorted(m["dtype"] for m in info["models"]) == ["bfloat16", "float32"]


def test_errors_are_the_same_one_line_as_in_process(ka, cli, tiny_model_src):
    for args in (("infer", "nope", "--prompt", "hi"), ("infer", "tiny", "--prompt", "hi", "--device", "tpu"),
                 ("infer", "tiny", "--prompt", "")):
        warm, local = cli(*args, env=KEEP), cli(*args, "--no-keep-alive", env=KEEP)
        assert_one_line_error(warm)
        assert (warm.returncode, warm.stderr, warm.stdout) == (local.returncode, local.stderr, local.stdout)
    relative = os.path.relpath(tiny_model_src, REPO_ROOT)  # a folder relative to the command's cwd
    result = cli("infer", relative, "--prompt", "Hi", "--max-tokens", "3", env=KEEP)
    assert result.returncode == 0, result


def test_the_warm_client_imports_no_torch(ka, cli):
    assert cli(*INFER, env=KEEP).returncode == 0  # the engine runs and holds the model
    code = ("import sys, contextlib, io\n"
            "from hyprstream_tui.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['--home', {str(ka)!r}, *{list(INFER)!r}]) == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'pygit2', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, **KEEP})
    assert proc.returncode == 0, proc.stderr


# ---- starting, replacing, stopping ------------------------------------------------------------
def test_racing_first_calls_start_one_engine(ka, cli):
    procs = [popen_cli(ka, *INFER, env=KEEP) for _ in range(3)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0, 0], results
    assert len({r[0] for r in results}) == 1 and all(r[1] == "" for r in results), results
    assert len(engine_pids(ka)) == 1
    log = (ka / "logs" / "keepalive.log").read_text()
    assert log.count("listening on") == 1, log


def test_a_killed_engine_is_replaced_with_one_line(ka, cli):
    assert cli(*INFER, env=KEEP).returncode == 0
    pid = status(cli)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not is_locked(EngineFiles.of(Paths.from_env(ka)).lock))
    result = cli(*INFER, env=KEEP)
    assert result.returncode == 0 and result.stderr == RESTARTED + "\n", result
    # the reply may come without torch (the model's bf16 or fp32 image), the new engine behind it
    assert wait_for(lambda: status(cli).get("ready"), timeout=90)
    new = status(cli)["pid"]
    assert new != pid and engine_pids(ka) == [new]
    assert cli(*INFER, env=KEEP).stderr == ""  # the note once, not on every call


def test_an_engine_dying_mid_reply_is_one_error_line(ka, cli, long_src):
    assert cli("model", "import", str(long_src), "--name", "long").returncode == 0
    proc = popen_cli(ka, *LONG, env=KEEP)
    assert proc.stdout is not None
    assert proc.stdout.read(1), proc.communicate(timeout=60)  # the reply has begun (else: why not)
    (pid,) = engine_pids(ka)
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert err.startswith("error: The engine process stopped") and err.count("\n") == 1, err
    assert "keepalive.log" in err and "Traceback" not in err


def test_ctrl_c_cancels_the_request_in_the_engine(ka, cli, long_src):
    assert cli("model", "import", str(long_src), "--name", "long").returncode == 0
    proc = popen_cli(ka, *LONG, env=KEEP)
    assert proc.stdout is not None
    assert proc.stdout.read(1), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "error: Stopped: the reply so far is shown above.\n", err
    info = status(cli)  # the engine lives on, with nothing running
    assert info["connections"] == 0 and engine_pids(ka) == [info["pid"]]
    done = json.loads(cli(*LONG[:-1], "5", "--json", env=KEEP).stdout)
    assert done["finish_reason"] == "length" and done["timings"]["load_s"] == 0


def test_the_idle_timeout_ends_the_engine_and_removes_its_socket(ka, cli):
    assert cli(*INFER, env={"HYPRSTREAM_KEEP_ALIVE": "1"}).returncode == 0
    files = EngineFiles.of(Paths.from_env(ka))
    assert files.socket.exists() and engine_pids(ka)
    assert wait_for(lambda: not engine_pids(ka) and not is_locked(files.lock), 30)
    assert not files.socket.exists()
    assert "idle for 1 s: leaving" in files.log.read_text()


def test_keep_alive_off_starts_no_engine(ka, cli):
    for args, env in ((INFER + ("--no-keep-alive",), KEEP), (INFER, {"HYPRSTREAM_KEEP_ALIVE": "0"}),
                      (("chat", "tiny", "--max-tokens", "3", "--no-keep-alive"), KEEP)):
        result = cli(*args, input="Hi\n/exit\n", env=env)
        assert result.returncode == 0, result
    assert engine_pids(ka) == [] and not socket_path(ka).exists()
    assert_one_line_error(cli(*INFER, env={"HYPRSTREAM_KEEP_ALIVE": "soon"}), "HYPRSTREAM_KEEP_ALIVE")


def test_engine_stop_and_status(ka, cli):
    assert "No engine process is running" in cli("engine", "status").stdout
    assert status(cli)["running"] is False
    assert "No engine process was running" in cli("engine", "stop").stdout
    assert cli(*INFER, env=KEEP).returncode == 0
    pid = status(cli)["pid"]
    result = cli("engine", "stop")
    assert result.returncode == 0 and result.stdout.strip() == f"Stopped the engine process {pid}."
    assert engine_pids(ka) == [] and not socket_path(ka).exists()
    assert status(cli)["running"] is False
    assert cli(*INFER, env=KEEP).stderr == ""  # a stopped engine is no crash: no note


def test_a_deep_home_gets_a_short_socket_path(engines, tiny_model_src):
    deep = engines / ("d" * 60) / ("e" * 60) / "home"
    assert len(str(deep / "run" / "engine.sock")) > MAX_SOCKET_PATH
    env = {**os.environ, **KEEP, "HYPRSTREAM_HOME": str(deep)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hyprstream_tui", *args], capture_output=True,
                              text=True, env=env, cwd=REPO_ROOT, timeout=120)

    assert run("model", "import", str(tiny_model_src), "--name", "tiny").returncode == 0
    assert run(*INFER).returncode == 0
    info = json.loads(run("engine", "status", "--json").stdout)
    sock = Path(info["socket"])
    assert sock.parent == Path(f"/tmp/hyprstream-{os.getuid()}") and len(str(sock)) <= MAX_SOCKET_PATH
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert run("engine", "stop").returncode == 0 and not sock.exists()


# ---- pieces ------------------------------------------------------------------------------------
def test_keep_alive_setting():
    assert keep_alive_seconds(None) == DEFAULT_KEEP_ALIVE_S == 300
    assert [keep_alive_seconds(v) for v in ("0", "0s", "off", "30", "30s", "5m", "1.5h")] == \
        [None, None, None, 30, 30, 300, 5400]
    for bad in ("-1", "soon", "5 minutes"):
        with pytest.raises(InvalidInput, match="HYPRSTREAM_KEEP_ALIVE"):
            keep_alive_seconds(bad)


def test_folder_specs_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("tiny:qa@v1") == "tiny:qa@v1"
    assert absolute_spec("./m") == str(tmp_path / "m")
    assert absolute_spec("./m:./ad") == f"{tmp_path / 'm'}:{tmp_path / 'ad'}"
    assert absolute_spec("m/x:poet/v1") == f"{tmp_path / 'm' / 'x'}:poet/v1"
