"""The TUI's plain parts: saved conversations, the commit-graph lanes, comparing LoRA weights, the
thread hand-off buffers, and that nothing heavy is imported before the first paint."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from hyprstream_tui.errors import InvalidInput, NotFound
from hyprstream_tui.tui.batch import Buffer, Latest
from hyprstream_tui.tui.compare import layer_changes, loss_curve
from hyprstream_tui.tui.conversations import ConversationStore, format_provenance
from hyprstream_tui.tui.widgets.commit_graph import build_rows


def test_conversations_are_saved_renamed_exported_and_deleted(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    conv = store.create("  first   chat ", model="tiny", adapter="quiz")
    assert conv.title == "first chat"
    user = store.add_message(conv.id, "user", "Hi *there*")
    meta = {"provenance": {"model": "tiny", "model_commit": "a" * 40, "adapter": "quiz", "adapter_commit": "b" * 40,
                           "params": {"temperature": 0.0, "max_tokens": 8}, "seed": 5}, "tok_s": 12.5,
            "finish_reason": "eos"}
    store.add_message(conv.id, "assistant", "Hello.", meta)
    assert [m.role for m in store.messages(conv.id)] == ["user", "assistant"]
    assert store.messages(conv.id)[1].meta == meta

    store.rename(conv.id, "Greetings")
    assert store.list()[0].title == "Greetings"
    markdown = store.export_markdown(conv.id)
    assert markdown.startswith("# Greetings\n") and "## user\n\nHi *there*" in markdown
    assert "tiny@aaaaaaa · adapter quiz@bbbbbbb" in markdown and "seed=5" in markdown
    lines = [json.loads(line) for line in store.export_jsonl(conv.id).splitlines()]
    assert lines[0] == {"role": "user", "content": "Hi *there*"} and lines[1]["meta"] == meta

    later = store.add_message(conv.id, "user", "again")
    store.delete_messages(conv.id, [user.id])
    assert [m.content for m in store.messages(conv.id)] == ["Hello.", "again"]
    store.truncate(conv.id, from_message=user.id)
    assert store.messages(conv.id) == [] and later.id > user.id
    with pytest.raises(InvalidInput):
        store.rename(conv.id, "   ")
    with pytest.raises(InvalidInput):
        store.add_message(conv.id, "robot", "beep")
    store.delete(conv.id)
    with pytest.raises(NotFound):
        store.get(conv.id)
    store.close()
    assert ConversationStore(tmp_path / "c.sqlite3").list() == []  # reopened: the deletion was written


def test_conversations_take_writes_from_many_threads(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    conv = store.create("busy")

    def write(n: int) -> None:
        for i in range(25):
            store.add_message(conv.id, "user", f"{n}-{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.messages(conv.id)) == 100


def test_provenance_line():
    line = format_provenance({"provenance": {"model": "m", "model_commit": None, "params": {"top_k": 3}, "seed": 1}})
    assert line == "m@? · top_k=3 · seed=1"


def _commit(sha: str, t: int, step=None):
    return SimpleNamespace(sha=sha, time=t, step=step, short=sha[:7])


def test_commit_graph_lanes():
    a, b = SimpleNamespace(name="a"), SimpleNamespace(name="b")
    rows = build_rows([(a, [_commit("a3", 30), _commit("a1", 10)]), (b, [_commit("b2", 20), _commit("b0", 5)])])
    assert [(r.lanes, r.commit.sha) for r in rows] == [("● ", "a3"), ("│●", "b2"), ("●│", "a1"), (" ●", "b0")]


def test_loss_curve_skips_bad_lines():
    text = '{"step": 1, "loss": 2.5}\nnot json\n{"step": 2}\n{"step": 3, "loss": 1.0}\n'
    assert loss_curve(text) == [(1, 2.5), (3, 1.0)]
    assert loss_curve(None) == []


def test_layer_changes_of_two_lora_checkpoints():
    from safetensors.numpy import save

    def weights(scale: float) -> bytes:
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"
        return save({f"{prefix}.lora_A.weight": np.ones((2, 4), np.float32),
                     f"{prefix}.lora_B.weight": np.full((3, 2), scale, np.float32)})

    (change,) = layer_changes(weights(0.0), weights(0.5))
    assert change.module == "L0.q_proj"
    assert change.norm_a == 0.0 and change.norm_b == pytest.approx(np.sqrt(12.0))  # every entry of B@A is 1.0
    assert change.change == pytest.approx(change.norm_b)
    assert layer_changes(None, None) == []


def test_buffers_hand_over_everything_or_the_latest():
    buffer: Buffer[int] = Buffer()
    threads = [threading.Thread(target=lambda: [buffer.push(i) for i in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(buffer.drain()) == 4000 and buffer.drain() == []
    latest: Latest[int] = Latest()
    assert latest.take() is None
    latest.set(1)
    latest.set(2)
    assert latest.take() == 2 and latest.take() is None


def test_the_tui_imports_no_torch_pygit2_or_other_screens_before_the_first_paint():
    code = ("import sys; import hyprstream_tui.cli; from hyprstream_tui.tui.app import HyprApp; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'pygit2', 'plotext', 'markdown_it') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
