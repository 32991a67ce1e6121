"""A real uvicorn server on 127.0.0.1 (random free port, in a thread) over a store holding the tiny
model `tiny` and an adapter `qa` with random nonzero LoRA weights (so it changes the answers).

The engine runs float32 on one thread: greedy answers are then bit-for-bit the same batched or
alone, and the tiny model's ops are too small to gain from a second thread.
"""

from __future__ import annotations

import os
from typing import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.server.live import Live, add_random_adapter, live_server, make_app  # noqa: E402


@pytest.fixture(scope="session")
def served_store(tmp_path_factory, tiny_model_src):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(tmp_path_factory.mktemp("served") / "home"))
    store.import_model(tiny_model_src, name="tiny")
    add_random_adapter(store, "tiny", "qa")
    store.create_adapter("tiny", "untrained", rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    return store


@pytest.fixture(scope="session")
def engine(served_store):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions

    return Engine(store=served_store, options=LoadOptions(dtype="float32"), threads=1)


@pytest.fixture(scope="module")
def live(engine) -> Iterator[Live]:
    """The shared server: max_batch 4, max_queue 8, no API key."""
    with live_server(make_app(engine, max_batch=4, max_queue=8)) as server:
        yield server
