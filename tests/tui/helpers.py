"""Helpers for the TUI tests: the screen as plain text, waiting for a condition, and adapters and
checkpoint commits on the demo model (without training)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable

from rich.console import Console


def screen_text(app) -> str:
    """What the terminal shows now, as text (the same render as a screenshot)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system="truecolor",
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def wait_for(pilot, condition: Callable[[], object], *, timeout: float = 60.0, what: str = "condition") -> object:
    """Let the app run until `condition()` is truthy; fail with what the screen shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}; errors {pilot.app.errors}; screen:\n{screen_text(pilot.app)}")


def count_layouts(screen) -> list[int]:
    """Count the screen's layouts (every widget arranged again) from now on: read `[0]`."""
    count = [0]
    refresh_layout = screen._refresh_layout

    def counted(*args, **kwargs):
        count[0] += 1
        return refresh_layout(*args, **kwargs)

    screen._refresh_layout = counted
    return count


def lora_weights(seed: int, *, layers: int = 4, hidden: int = 128, kv: int = 64, rank: int = 8,
                 scale: float = 0.01) -> bytes:
    """PEFT-format LoRA weights (q_proj, v_proj) for the demo model's shape, seeded."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, hidden)) * 0.05).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, rank)) * scale).astype(np.float32)
    return save(tensors, metadata={"format": "pt"})


def add_checkpoint(home: Path, adapter: str = "quiz", step: int = 10, loss: float = 1.0):
    """A checkpoint commit with seeded LoRA weights (no training run needed)."""
    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    return store.write_files(DEMO_NAME, adapter, {"adapter/adapter_model.safetensors": lora_weights(step, scale=0.5)},
                             f"Checkpoint at step {step}", {"step": step, "loss": loss})


def add_adapter(home: Path, name: str = "quiz", samples: int = 4):
    """An adapter on the demo model with `samples` question/answer pairs; returns its AdapterInfo."""
    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    info = store.create_adapter(DEMO_NAME, name)
    rows = [{"input": f"Question {i}?", "output": f"Answer {i}."} for i in range(samples)]
    if rows:
        add_samples(store, DEMO_NAME, name, rows)
    return info
