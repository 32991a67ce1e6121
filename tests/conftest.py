"""Fixtures shared by every test folder: a fresh HYPRSTREAM_HOME, a real store, a tiny real model,
and a runner for the real `hyprstream` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# `infer` / `chat` in-process: a keep-alive engine per throwaway home would hold its model for 5
# minutes after each test (tests/cli/test_keepalive.py turns it on where it is the subject).
os.environ["HYPRSTREAM_KEEP_ALIVE"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.helpers import REPO_ROOT, Result  # noqa: E402


def pytest_configure(config) -> None:
    """Tests that use no `home` still write somewhere (the native kernel's build cache,
    `engine.tuned.gemv`): a folder of this run's, never the user's ~/.cache/hyprstream."""
    import tempfile

    config._hyprstream_home = tempfile.mkdtemp(prefix="hyprstream-test-home-")
    os.environ["HYPRSTREAM_HOME"] = config._hyprstream_home


def pytest_unconfigure(config) -> None:
    import shutil

    shutil.rmtree(getattr(config, "_hyprstream_home", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_src(tmp_path_factory) -> Path:
    """A tiny real Qwen2 model folder (safetensors + config + tokenizer), built once."""
    from hyprstream_tui.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("src") / "tiny", arch="qwen2", seed=0)


@pytest.fixture(autouse=True)
def bf16_images_written():
    """A bf16 load writes its model's image in a background thread (`tuned.exact_image.save_soon`):
    each test ends once it has, so that no write lands in the next test's time or a removed home."""
    yield
    from hyprstream_tui.engine.tuned import exact_image

    exact_image.settle()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("HYPRSTREAM_HOME", str(path))
    return path


@pytest.fixture
def store(home):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return Store(Paths.from_env(home))


@pytest.fixture
def tiny_store(store, tiny_model_src):
    """A store holding the tiny model as `tiny`."""
    store.import_model(tiny_model_src, name="tiny")
    return store


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


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real model's GGUF (SmolLM2-135M-Instruct, Q4_1), fetched once into its cache."""
    from tests.realmodel import gguf_path

    return gguf_path()


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory, smollm2_gguf) -> Path:
    """A home holding the real model as `smollm2`, imported from its GGUF once per run (the real
    import path). Tests read it; a test that writes takes `real_home`, a copy of its own."""
    from hyprstream_tui.engine.gguf import import_gguf
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from tests.realmodel import MODEL_NAME

    path = tmp_path_factory.mktemp("smollm2") / "home"
    import_gguf(Store(Paths.from_env(path)), smollm2_gguf, name=MODEL_NAME)
    return path


def _link_or_copy(src: str, dst: str) -> None:
    """Weights (never written in place: the store replaces files) are hard-linked, the rest copied."""
    if os.path.getsize(src) > 1 << 20:
        os.link(src, dst)
    else:
        import shutil

        shutil.copy2(src, dst)


@pytest.fixture
def real_home(home, smollm2_home) -> Path:
    """A fresh home (the `home` fixture's path and environment) holding the real model as
    `smollm2`: the session's import, copied with its weights hard-linked (same commits)."""
    import shutil

    shutil.copytree(smollm2_home, home, symlinks=True, copy_function=_link_or_copy)
    return home


@pytest.fixture
def cli(home):
    """Run `python -m hyprstream_tui ARGS` against the test's home; returns (code, stdout, stderr)."""

    def run(*args: str, input: str | None = None, timeout: float = 120, env: dict | None = None) -> Result:
        full_env = {**os.environ, "HYPRSTREAM_HOME": str(home), "COLUMNS": "200", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "hyprstream_tui", *map(str, args)], capture_output=True, text=True,
                              input=input, timeout=timeout, env=full_env, cwd=REPO_ROOT)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


LONG_RUN = "HYPRSTREAM_LONG_TESTS"


def pytest_collection_modifyitems(config, items) -> None:
    """The `long` marker in one place: a test marked `@pytest.mark.long` runs only with
    HYPRSTREAM_LONG_TESTS=1 (tests that merely grow with that variable are not marked)."""
    if os.environ.get(LONG_RUN) == "1":
        return
    skip = pytest.mark.skip(reason=f"long run only: set {LONG_RUN}=1 "
                                   f"(e.g. `{LONG_RUN}=1 python -m pytest -m long`)")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)
