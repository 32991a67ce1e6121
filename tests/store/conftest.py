"""Fixtures for the store tests. `hub_server`: a fake Hugging Face Hub on 127.0.0.1 (tests/hubserver.py)."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # so that `from tests.hubserver import ...` works under any import mode
    sys.path.insert(0, str(_ROOT))

from tests.hubserver import hub_server  # noqa: E402,F401 - a fixture
