"""Helpers for the server tests: a real uvicorn server on 127.0.0.1 (random free port, in a
thread) for an app, the app over an engine, an adapter with random nonzero LoRA weights, and a
polling wait."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from tests.helpers import REPO_ROOT  # noqa: F401 - for the server tests that start `hyprstream serve`

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


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
