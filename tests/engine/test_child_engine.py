"""The engine in a child process (the TUI's): the same replies, events, errors and cancel as the
in-process Engine, over a pipe; closing it ends the process."""

from __future__ import annotations

import os
import threading

import pytest

from hyprstream_tui.engine.child import ChildEngine
from hyprstream_tui.engine.engine import Engine
from hyprstream_tui.engine.events import GenerationDone, ModelLoaded, TokenDelta
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.errors import InvalidInput, NotFound

MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_qwen2):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    paths = Paths.from_env(tmp_path_factory.mktemp("child") / "home")
    store = Store(paths)
    store.import_model(tiny_qwen2, name="tiny")
    child = ChildEngine(paths)
    yield child, Engine(store=store)
    child.close()


def test_a_reply_from_the_child_equals_the_in_process_engine(engines):
    child, local = engines
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=24)
    events = []
    done = child.chat("tiny", MESSAGES, params, on_event=events.append).result(timeout=120)
    assert child.pid != os.getpid()
    assert done.text == local.chat("tiny", MESSAGES, params).result().text
    assert isinstance(events[-1], GenerationDone) and events[-1] == done
    assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == done.text
    assert isinstance(events[0], ModelLoaded)  # the child loaded the model for this first request


def test_errors_come_back_as_the_same_class(engines):
    child, _ = engines
    with pytest.raises(NotFound, match="No model named 'nope'"):
        child.chat("nope", MESSAGES, SamplingParams()).result(timeout=60)
    with pytest.raises(InvalidInput):
        child.chat("tiny", [{"role": "user", "content": ""}], SamplingParams()).result(timeout=60)


def test_cancel_ends_the_reply_in_the_child(engines):
    child, _ = engines
    jobs = []
    first = threading.Event()
    jobs.append(child.chat("tiny", MESSAGES, SamplingParams(temperature=1.0, seed=1, max_tokens=400),
                           on_event=lambda e: first.set()))
    assert first.wait(60)
    jobs[0].cancel()  # within one decode step of the first token
    done = jobs[0].result(timeout=60)
    assert done.finish_reason == "cancelled" and done.completion_tokens < 400


def test_closing_ends_the_process(tmp_path):
    from hyprstream_tui.settings import Paths

    child = ChildEngine(Paths.from_env(tmp_path / "home"))
    assert child._proc.is_alive()
    child.close()
    assert not child._proc.is_alive() and child._proc.exitcode == 0


def _report_settings(conn, env) -> None:
    from hyprstream_tui.engine.forkserver import take_settings

    before = os.environ.get("HYPRSTREAM_PROBE")
    take_settings(env)
    conn.send((before, os.environ.get("HYPRSTREAM_PROBE")))
    conn.close()


def test_a_child_takes_the_parents_settings_not_the_forkservers(engines, monkeypatch):
    # The forkserver (started by the fixture's ChildEngine) keeps the environment it started with;
    # a HYPRSTREAM_ setting set since must still reach a child through take_settings.
    from hyprstream_tui.engine.forkserver import context, settings

    monkeypatch.setenv("HYPRSTREAM_PROBE", "set after the forkserver started")
    ctx = context()
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_report_settings, args=(theirs, settings()))
    proc.start()
    theirs.close()
    assert ours.poll(60)
    before, after = ours.recv()
    proc.join(30)
    assert before is None  # the forkserver's environment, as the premise says
    assert after == "set after the forkserver started"


def test_taking_settings_drops_one_the_parent_no_longer_has(monkeypatch):
    from hyprstream_tui.engine.forkserver import settings, take_settings

    monkeypatch.setenv("HYPRSTREAM_GONE", "set in the forkserver's time")
    monkeypatch.setenv("HYPRSTREAM_KEPT", "both have it")
    parents = {k: v for k, v in settings().items() if k != "HYPRSTREAM_GONE"}
    take_settings(parents)
    assert "HYPRSTREAM_GONE" not in os.environ
    assert os.environ["HYPRSTREAM_KEPT"] == "both have it"
    assert settings() == parents
