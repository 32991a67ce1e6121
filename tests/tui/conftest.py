"""TUI fixtures: the fake hub for pulls (the demo model's `demo_src` and `demo_home` are in
tests/conftest.py, shared with the web tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


from tests.hubserver import hub_server  # noqa: E402,F401 - the fake hub, for pulls from the Models screen
