"""TUI fixtures: the app on a fresh home, and a home that already holds the demo model."""

from __future__ import annotations

import os
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
