"""A real uvicorn server on 127.0.0.1 (random free port, in a thread) over a store holding the tiny
model `tiny` and an adapter `qa` with random nonzero LoRA weights (so it changes the answers).

The engine runs float32 on one thread: greedy answers are then bit-for-bit the same batched or
alone, and the tiny model's ops are too small to gain from a second thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
LONG_PROMPT = "Once upon a time"  # with temperature 1 and seed 1 the tiny model runs 400+ tokens


def add_random_adapter(store, model: str, name: str, *, seed: int = 1) -> None:
    """Create adapter `name` and commit random (nonzero) LoRA weights on its branch."""
    import shutil
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store.create_adapter(model, name, rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    base = AutoModelForCausalLM.from_pretrained(str(store.model_dir(model)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=False)
        peft_model = get_peft_model(base, config)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        shutil.copyfile(f"{tmp}/adapter_model.safetensors",
                        store.worktree(model, name) / "adapter" / "adapter_model.safetensors")
    store.commit_worktree(model, name, "Random LoRA weights for the server tests", {},
                          paths=["adapter/adapter_model.safetensors"])


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str  # http://127.0.0.1:PORT
    app: Any
    events: list = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def batcher(self):
        return self.app.state.batcher


@contextlib.contextmanager
def live_server(app) -> Iterator[Live]:
    """Serve `app` with uvicorn in a thread; every batcher event is recorded in `.events`."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    live = Live(url=f"http://127.0.0.1:{port}", app=app)
    app.state.batcher.add_listener(live.events.append)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_app(engine, **kwargs):
    from hyprstream_tui.engine.batching import Batcher
    from hyprstream_tui.server.app import create_app

    batch = {k: kwargs.pop(k) for k in ("max_batch", "max_queue") if k in kwargs}
    return create_app(Batcher(engine, **batch), **kwargs)


@pytest.fixture(scope="module")
def live(engine) -> Iterator[Live]:
    """The shared server: max_batch 4, max_queue 8, no API key."""
    with live_server(make_app(engine, max_batch=4, max_queue=8)) as server:
        yield server


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
