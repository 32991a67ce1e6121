"""Web fixtures: a home holding the demo model, and `hyprstream web` on it (stopped afterwards,
with a check that the server left no process behind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.web.live import describe, start_web, wait_gone


@pytest.fixture(scope="session")
def web_demo_src(tmp_path_factory) -> Path:
    """The demo model folder, built once per session (what the app's demo offer builds)."""
    from hyprstream_tui.engine.tiny import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("web-demo") / "tiny-demo")


@pytest.fixture
def web_home(home, web_demo_src) -> Path:
    """A home whose store holds the demo model as `tiny-demo`."""
    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    Store(Paths.from_env(home)).import_model(web_demo_src, name=DEMO_NAME)
    return home


@pytest.fixture
def web(web_home, tmp_path):
    """Start `hyprstream web ARGS` on the demo home (token `live.TOKEN` unless `token=`). On
    teardown: SIGTERM, then no app process nor engine child may be left."""
    servers = []

    def start(*args: str, **kwargs):
        server = start_web(web_home, tmp_path, *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        tree = server.descendants()
        assert server.stop() == 0, server.log.read_text()
        left = wait_gone(tree, timeout=30)
        assert not left, f"left behind by hyprstream web: {describe(left)}"
