"""The TUI's one place for text formatting: sizes, counts, times, durations, metrics."""

from __future__ import annotations

import time
from typing import Any


def size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def count(n: int) -> str:
    value = float(n)
    for unit in ("", "K", "M", "B"):
        if abs(value) < 1000 or unit == "B":
            return f"{value:.0f}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}B"


def when(ts: float | int) -> str:
    """UTC date and minute: stable across time zones (and in snapshots)."""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return "" if value is None else str(value)


def duration(seconds: float) -> str:
    """A length of time: 42s, 11m34s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


DURATION_METRICS = frozenset({"elapsed"})  # commit trailers that count seconds


def commit_metric(key: str, value: Any) -> str:
    """A commit trailer's value: seconds as a duration (`elapsed 11m34s`), other numbers as `metric`."""
    if key in DURATION_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return duration(value)
    return metric(value)
