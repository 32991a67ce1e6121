"""Fixtures for the store tests. Hub fixtures: a fake Hugging Face Hub on 127.0.0.1 (tests/hubserver.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # so that `from tests.hubserver import FakeHub` works under any import mode
    sys.path.insert(0, str(_ROOT))

from tests.hubserver import FakeHub  # noqa: E402


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running FakeHub; HF_ENDPOINT points at it and the HF cache (HF_HOME) is in tmp_path.

    Other conftests set HF_HUB_OFFLINE=1 before huggingface_hub is imported, which freezes it into
    huggingface_hub.constants: that constant is switched off here for the test's duration (and a
    developer's own HF token is never sent: HF_HUB_DISABLE_IMPLICIT_TOKEN, also read at import).
    """
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)  # never send a real token here
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub
