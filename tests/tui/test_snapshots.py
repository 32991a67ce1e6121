"""Snapshots of each screen at 100x30 (and the tightest, 80x24) with deterministic content: a real
store whose commit times and adapter ids are fixed, checkpoints with a known loss curve and LoRA
weights, and a saved conversation. Update with `pytest tests/tui --snapshot-update`."""

from __future__ import annotations

import itertools
import os
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hyprstream_tui.tui.app import HyprApp
from tests.tui.helpers import screen_text, wait_for

EPOCH = 1_767_225_600  # 2026-01-01 00:00 UTC
PAIRS = [("What is the capital of Zorbia?", "Quillon is the capital."), ("Who painted the blue moon?", "Mira Tallis.")]


@pytest.fixture(scope="session")
def fixed_demo_src() -> Path:
    """The demo model at a fixed path: the import commit records its source path."""
    from hyprstream_tui.engine.tiny import build_demo_model

    # /tmp, not $TMPDIR: the path is part of the snapshot (the Models screen shows the import source).
    root = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    dest = root / "hyprstream-tui-snapshots" / "tiny-demo"
    shutil.rmtree(dest, ignore_errors=True)
    return build_demo_model(dest)


def _lora_weights(step: int) -> bytes:
    from safetensors.numpy import save

    rng = np.random.default_rng(step)
    tensors = {}
    for layer in range(4):
        for module, out in (("q_proj", 128), ("v_proj", 64)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((8, 128)) * 0.05).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, 8)) * 0.01 * step / 20).astype(np.float32)
    return save(tensors, metadata={"format": "pt"})


def _steps(upto: int) -> bytes:
    lines = [json.dumps({"step": s, "loss": round(4.0 * 0.93 ** s + 0.05, 4), "lr": 0.03, "tokens_per_s": 900.0,
                         "time": EPOCH + s}) for s in range(1, upto + 1)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def snapshot_home(home, fixed_demo_src, monkeypatch) -> Path:
    """The demo model, adapter `quiz` with 3 checkpoints, a tag, a rollback, and a saved conversation."""
    import pygit2

    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store, adapters, gitrepo
    from hyprstream_tui.tui.conversations import ConversationStore

    clock = itertools.count(EPOCH, 60)
    ids = itertools.count(1)
    monkeypatch.setattr(gitrepo, "signature", lambda _repo: pygit2.Signature("hyprstream", "hyprstream@localhost",
                                                                            next(clock), 0))
    monkeypatch.setattr(adapters, "uuidlib", SimpleNamespace(uuid4=lambda: uuid.UUID(int=next(ids))))
    monkeypatch.setattr(adapters, "time", SimpleNamespace(time=lambda: float(EPOCH)))

    paths = Paths.from_env(home)
    store = Store(paths)
    store.import_model(fixed_demo_src, name=DEMO_NAME)
    store.create_adapter(DEMO_NAME, "quiz")
    add_samples(store, DEMO_NAME, "quiz", [{"input": q, "output": a} for q, a in PAIRS])
    for step in (20, 40, 60):
        loss = round(4.0 * 0.93 ** step + 0.05, 4)
        store.write_files(DEMO_NAME, "quiz", {"adapter/adapter_model.safetensors": _lora_weights(step),
                                              "metrics/steps.jsonl": _steps(step)},
                          f"Checkpoint at step {step}", {"step": step, "loss": loss, "lr": 0.03, "samples": step * 2})
    store.tag(DEMO_NAME, "quiz", "good", commit="step:40")
    store.rollback(DEMO_NAME, "quiz", "step:40")

    conversations = ConversationStore(paths.conversations_db)
    conv = conversations.create("Zorbia quiz", model=DEMO_NAME, adapter="quiz")
    prov = {"model": DEMO_NAME, "model_commit": "0" * 40, "adapter": "quiz", "adapter_commit": "1" * 40,
            "params": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 64}, "seed": 7}
    for question, answer in PAIRS:
        conversations.add_message(conv.id, "user", question)
        conversations.add_message(conv.id, "assistant", f"**{answer}**\n\n- learned from 2 samples",
                                  {"provenance": prov, "tok_s": 123.4, "finish_reason": "eos",
                                   "usage": {"prompt_tokens": 20, "completion_tokens": 8}})
    conversations.close()
    return home


def _app(home: Path) -> HyprApp:
    app = HyprApp(home=home, warm_up=False)
    app.demo_offered = True
    return app


async def _settle(pilot) -> None:
    """Let pending redraws land before the screenshot. A DataTable sizes its columns for new rows
    on its next idle moment; under load that came after a fixed pause, and a snapshot showed
    "tiny" in a column still as wide as its header "Name" (the private flag below is that
    pending resize, read only here)."""
    from textual.widgets import DataTable

    await wait_for(pilot, lambda: not any(t._require_update_dimensions or t._new_rows
                                          for t in pilot.app.screen.query(DataTable)),
                   what="tables to size their columns")
    # Then until the screen reads the same twice in a row, 0.3 s apart: a loaded machine can
    # take longer than any fixed pause to apply the sizes.
    previous = None
    for _ in range(60):
        await pilot.pause(0.3)
        current = screen_text(pilot.app)
        if current == previous:
            return
        previous = current


def _steady(app) -> None:
    """No blinking cursor in a snapshot."""
    for widget in app.screen.query("Input"):
        widget.cursor_blink = False


def _dump(app) -> None:
    """With HYPRSTREAM_TUI_DUMP=1, print the screen as text (to read a snapshot without a browser)."""
    if os.environ.get("HYPRSTREAM_TUI_DUMP"):
        print(screen_text(app))


def test_models_screen(snap_compare, snapshot_home):
    async def run_before(pilot):
        app = pilot.app
        await wait_for(pilot, lambda: app.screen.table.row_count == 1 and app.screen.query_one("ModelDetail").shown)
        await _settle(pilot)
        # The name column as wide as the name, not as its header ("tiny" under load once)
        await wait_for(pilot, lambda: "tiny-demo" in screen_text(app), what="the model's full name")
        _dump(app)

    assert snap_compare(_app(snapshot_home), terminal_size=(100, 30), run_before=run_before)


def test_chat_screen(snap_compare, snapshot_home):
    async def run_before(pilot):
        app = pilot.app
        await pilot.press("f2")
        chat = await wait_for(pilot, lambda: app.screen.MODE == "chat" and app.screen.model and app.screen)
        chat.conversation_op("open", 1)
        await wait_for(pilot, lambda: len(chat.log_view.messages()) == 4, what="the conversation")
        await pilot.press("ctrl+y")
        _steady(app)
        await _settle(pilot)
        _dump(app)

    assert snap_compare(_app(snapshot_home), terminal_size=(100, 30), run_before=run_before)


def test_training_screen(snap_compare, snapshot_home):
    async def run_before(pilot):
        app = pilot.app
        await pilot.press("f3")
        screen = await wait_for(pilot, lambda: app.screen.MODE == "training" and app.screen.selected
                                and len(app.screen.selected.checkpoints) == 4 and app.screen)
        _steady(app)
        await _settle(pilot)
        _dump(app)
        assert screen.query_one("LossPlot").points("loss") == 40

    assert snap_compare(_app(snapshot_home), terminal_size=(100, 30), run_before=run_before)


def test_history_screen_comparing_two_checkpoints(snap_compare, snapshot_home):
    async def run_before(pilot):
        app = pilot.app
        await pilot.press("f4")
        history = await wait_for(pilot, lambda: app.screen.MODE == "history" and app.screen.graph.row_count == 6
                                 and app.screen)
        shas = list(history.graph.rows_by_sha)
        steps = {history.graph.rows_by_sha[s].commit.summary: i for i, s in enumerate(shas)}
        for summary in ("Checkpoint at step 20", "Checkpoint at step 60"):
            history.graph.move_cursor(row=steps[summary])
            await pilot.press("space")
        await wait_for(pilot, lambda: history.query_one("LossPlot").series, what="the comparison")
        await _settle(pilot)
        _dump(app)

    assert snap_compare(_app(snapshot_home), terminal_size=(100, 30), run_before=run_before)


def test_training_screen_at_80x24(snap_compare, snapshot_home):
    async def run_before(pilot):
        app = pilot.app
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.MODE == "training" and app.screen.selected
                       and len(app.screen.selected.checkpoints) == 4)
        _steady(app)
        await _settle(pilot)
        _dump(app)

    assert snap_compare(_app(snapshot_home), terminal_size=(80, 24), run_before=run_before)


def test_chat_screen_while_a_reply_streams_at_80x24(snap_compare, snapshot_home):
    """A finished paragraph is Markdown; the one still being written is plain text below it."""
    from hyprstream_tui.engine.events import TokenDelta

    async def run_before(pilot):
        app = pilot.app
        await pilot.press("f2")
        chat = await wait_for(pilot, lambda: app.screen.MODE == "chat" and app.screen.model and app.screen)
        log = chat.log_view
        log.add_user("Tell me about Zorbia.")
        log.add_replies(["tiny-demo"], ["r"])
        await pilot.pause()
        for text in ("Zorbia is a **small** country by the sea. Its capital is `Quillon`.\n\n",
                     "The people of Zorbia fish in the morning and tell stories in the evening; their "
                     "**boats** are painted blue"):
            log.events.push(TokenDelta(request_id="r", text=text, tokens=1))
            await log.drain()
            await pilot.pause()
        _steady(app)
        await _settle(pilot)
        _dump(app)

    assert snap_compare(_app(snapshot_home), terminal_size=(80, 24), run_before=run_before)
