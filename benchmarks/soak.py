"""The long runs of the reliability suite (issue 7): the same tests as the default run, longer.

    python benchmarks/soak.py                          # all of tests/reliability, long settings
    python benchmarks/soak.py tests/reliability/test_server_load.py
    HYPRSTREAM_LOAD_SECONDS=900 python benchmarks/soak.py tests/reliability/test_server_load.py

It is exactly `HYPRSTREAM_LONG_TESTS=1 python -m pytest -q -s [PATHS...]`: with
that variable the server load test runs 5 minutes instead of 1 (HYPRSTREAM_LOAD_SECONDS overrides
either), the hostile-name server sweep sends every request both streamed and not, the Hypothesis
properties try ten times the examples, and the other reliability tests use their own long
settings. `-s` shows the figures each test prints (requests, 503s, hang-ups, TTFT, RSS, ...).
Extra pytest options pass through (e.g. `-k load -x`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    paths = argv or ["tests/reliability"]
    env = {**os.environ, "HYPRSTREAM_LONG_TESTS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", *paths]
    print("$ HYPRSTREAM_LONG_TESTS=1 " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
