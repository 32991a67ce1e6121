"""The warm `infer` (cli/quick.py): with an engine of ours listening, `hyprstream infer` answers over
plain messages without importing the engine's event classes or any dataclass, and keeps the full
path's behaviour: the same answer, Ctrl-C cancels in the engine, a dying engine is one line. Real
`hyprstream` processes and real engine processes (fixtures of test_keepalive.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from hyprstream_tui.cli import build_parser
from hyprstream_tui.cli.quick import home_of, quick_infer
from hyprstream_tui.settings import Paths
from tests.cli import test_keepalive as keepalive
from tests.helpers import REPO_ROOT

engines, ka, long_src = keepalive.engines, keepalive.ka, keepalive.long_src  # its fixtures
KEEP, INFER, LONG = keepalive.KEEP, keepalive.INFER, keepalive.LONG


def test_the_warm_infer_imports_no_event_class_and_answers_the_same(ka, cli):
    first = json.loads(cli(*INFER, "--json", env=KEEP).stdout)  # starts the engine: the full path
    code = ("import sys, contextlib, io\n"
            "from hyprstream_tui.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            f"    assert main(['--home', {str(ka)!r}, *{list(INFER)!r}, '--json']) == 0\n"
            "loaded = [m for m in ('dataclasses', 'hyprstream_tui.engine.events', 'hyprstream_tui.engine.params',\n"
            "          'hyprstream_tui.engine.keepalive_protocol', 'multiprocessing', 'torch') if m in sys.modules]\n"
            "assert not loaded, loaded\n"
            "print(out.getvalue())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, **KEEP})
    assert proc.returncode == 0, proc.stderr
    warm = json.loads(proc.stdout)
    assert warm["text"] == first["text"] and warm["usage"] == first["usage"]
    assert warm["timings"]["load_s"] == 0 and warm["model"] == "tiny"
    plain = cli(*INFER, env=KEEP)  # streamed text and its newline, as the full path prints it
    assert plain.returncode == 0 and plain.stdout == first["text"] + "\n" and plain.stderr == ""


def test_without_an_engine_it_steps_aside_having_printed_nothing(ka, monkeypatch):
    monkeypatch.setenv("HYPRSTREAM_KEEP_ALIVE", "60")
    args = build_parser("infer").parse_args(["--home", str(ka), *INFER])
    printed: list[str] = []
    assert quick_infer(args, write=printed.append) is None and printed == []
    args = build_parser("infer").parse_args(["--home", str(ka), *INFER, "--no-keep-alive"])
    assert quick_infer(args, write=printed.append) is None and printed == []


def test_ctrl_c_and_a_dying_engine_on_the_warm_path(ka, cli, long_src):
    assert cli("model", "import", str(long_src), "--name", "long").returncode == 0
    assert cli(*LONG[:-1], "2", env=KEEP).returncode == 0  # the engine runs, `long` loaded
    proc = keepalive.popen_cli(ka, *LONG, env=KEEP)
    assert proc.stdout is not None
    assert proc.stdout.read(1), proc.communicate(timeout=60)  # the reply has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "error: Stopped: the reply so far is shown above.\n", err
    info = keepalive.status(cli)  # the engine lives on, with nothing running
    assert info["connections"] == 0 and keepalive.engine_pids(ka) == [info["pid"]]

    proc = keepalive.popen_cli(ka, *LONG, env=KEEP)
    assert proc.stdout is not None
    assert proc.stdout.read(1), proc.communicate(timeout=60)
    os.kill(info["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert err.startswith("error: The engine process stopped") and err.count("\n") == 1, err
    assert "keepalive.log" in err and "Traceback" not in err


def test_its_home_is_the_one_settings_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    for env in (None, "", "relative/home", str(tmp_path / "abs"), "~/h"):
        if env is None:
            monkeypatch.delenv("HYPRSTREAM_HOME", raising=False)
        else:
            monkeypatch.setenv("HYPRSTREAM_HOME", env)
        for given in (None, "given", "~/given", str(tmp_path / "g")):
            assert home_of(given) == Paths.from_env(given).home, (env, given)


def test_the_channel_frames_as_multiprocessing_connection_does():
    """Channel (engine/keepalive_wire.py) against multiprocessing's Connection on a real socket
    pair: small and large messages both ways; a peer that closes mid-message is an EOFError."""
    import socket
    import threading
    from multiprocessing.connection import Connection

    import pytest

    from hyprstream_tui.engine.keepalive_wire import Channel

    a, b = socket.socketpair()
    ours, theirs = Channel(a), Connection(b.detach())
    big = {"text": "x" * 300_000, "ids": list(range(5000))}
    for message in (("hello", 1, 60.0), big):  # sent from a thread: more than a socket buffer holds
        sender = threading.Thread(target=ours.send, args=(message,))
        sender.start()
        assert theirs.recv() == message
        sender.join(10)
        sender = threading.Thread(target=theirs.send, args=(message,))
        sender.start()
        assert ours.poll(5) and ours.recv() == message
        sender.join(10)
    theirs._send(b"\x00\x00\x01\x00" + b"partial")  # announces 256 bytes, sends 7, then closes
    theirs.close()
    with pytest.raises(EOFError):
        ours.recv()
    ours.close()


def test_an_engine_still_warming_up_is_left_to_the_full_path(tmp_path, monkeypatch):
    """An engine started behind a reply without torch (engine/light.py) says in its welcome that
    it is not ready yet; the warm path then steps aside, having printed nothing, so the full path
    can answer without it. The engine mid-warm-up is a moment: a stand-in on a real Unix socket
    speaks its welcome (the real engine's is tests/engine/test_light.py's keep-alive test)."""
    import socket
    import threading

    from hyprstream_tui import __version__
    from hyprstream_tui.engine.keepalive_wire import PROTOCOL, Channel, socket_path

    home = tmp_path / "home"
    path = socket_path(home)
    path.parent.mkdir(parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    heard: list[object] = []

    def warming() -> None:
        conn, _ = server.accept()
        channel = Channel(conn)
        heard.append(channel.recv())
        channel.send(("welcome", PROTOCOL, __version__, os.getpid(), False))
        try:
            heard.append(channel.recv() if channel.poll(5) else "silent")
        except EOFError:
            heard.append("hung up")  # sent nothing more: no request reached the warming engine
        conn.close()

    thread = threading.Thread(target=warming, daemon=True)
    thread.start()
    monkeypatch.setenv("HYPRSTREAM_KEEP_ALIVE", "60")
    args = build_parser("infer").parse_args(["--home", str(home), *INFER])
    printed: list[str] = []
    try:
        assert quick_infer(args, write=printed.append) is None and printed == []
        thread.join(10)
    finally:
        server.close()
    assert heard[0][0] == "hello" and heard[1] == "hung up"
