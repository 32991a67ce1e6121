"""TUI fixtures: the app on a fresh home, and a home that already holds the demo model."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    """The demo model folder, built once per session (what the app's demo offer builds)."""
    from hyprstream_tui.engine.tiny import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "tiny-demo")


@pytest.fixture
def demo_home(home, demo_src) -> Path:
    """A home whose store holds the demo model as `tiny-demo`."""
    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    Store(Paths.from_env(home)).import_model(demo_src, name=DEMO_NAME)
    return home


from tests.hubserver import hub_server  # noqa: E402,F401 - the fake hub, for pulls from the Models screen


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
