"""Web fixtures: `hyprstream web` on a home holding the demo model (`demo_home`, tests/conftest.py) (stopped afterwards,
with a check that the server left no process behind)."""

from __future__ import annotations

import pytest

from tests.web.live import describe, start_web, wait_gone


@pytest.fixture
def web(demo_home, tmp_path):
    """Start `hyprstream web ARGS` on the demo home (token `live.TOKEN` unless `token=`). On
    teardown: SIGTERM, then no app process nor engine child may be left."""
    servers = []

    def start(*args: str, **kwargs):
        server = start_web(demo_home, tmp_path, *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        tree = server.descendants()
        assert server.stop() == 0, server.log.read_text()
        left = wait_gone(tree, timeout=30)
        assert not left, f"left behind by hyprstream web: {describe(left)}"
