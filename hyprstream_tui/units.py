"""Sizes, counts, times and durations as text: one style each, for the CLI and the TUI alike.

    size(1_500_000)     -> "1.5 MB"            (decimal units: B, KB, MB, GB, TB)
    count(494_032_768)  -> "494.0M"            (plain below 1000, then K, M, B)
    duration(694)       -> "11m34s"            (42s, 11m34s, 1h02m)
    eta(None)           -> "-"                 (a duration, or "-" while unknown)
    when(1714566840)    -> "2024-05-01 12:34"  (UTC, to the minute)
    metric(0.00031)     -> "3.10e-04"          (a loss or learning rate: 4 decimals, tiny ones in e-notation)
    parse_size("1.5GB") -> 1_500_000_000       (the other way: a size as a user types it)

Standard library only: every layer (store, engine, server, tui, cli) may import it.
"""

from __future__ import annotations

import math
import time

SIZE_UNITS = ("B", "KB", "MB", "GB", "TB")
COUNT_UNITS = ("", "K", "M", "B")


def size(n: int | float) -> str:
    """Bytes: `999 B`, `1.0 KB`, `1.5 MB`, `2.3 GB`; TB is the largest unit."""
    value = float(n)
    for unit in SIZE_UNITS:
        if abs(value) < 1000 or unit == SIZE_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """Bytes from `1500`, `500MB`, `1.5 GB`, `2g` (decimal units, as `size` writes them);
    ValueError for anything else."""
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTB")
    unit = raw[len(number):]
    unit = unit if unit.endswith("B") or not unit else unit + "B"
    if unit and unit not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    value = float(number) * 1000 ** (SIZE_UNITS.index(unit) if unit else 0)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a size: {text!r}")
    return int(value)


def count(n: int | float) -> str:
    """A number of things (parameters, tokens): `999`, `1.0K`, `494.0M`, `1.5B`."""
    value = float(n)
    for unit in COUNT_UNITS:
        if abs(value) < 1000 or unit == COUNT_UNITS[-1]:
            return f"{value:.0f}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """A length of time, rounded to the second: `42s`, `11m34s`, `1h02m` (negative counts as 0)."""
    whole = max(0, int(round(seconds))) if math.isfinite(seconds) else 0
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def eta(seconds: float | None) -> str:
    """Time left: a `duration`, or `-` while it cannot be told (None, NaN, infinite)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return duration(seconds)


def when(ts: float | int) -> str:
    """A moment as UTC date and minute: the same in every time zone (and in snapshots)."""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def metric(value: object) -> str:
    """A loss, learning rate or other measured value: floats with 4 decimals (`0.1234`), below
    0.001 in e-notation (`3.00e-04`); other values as they are; None as nothing."""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return "" if value is None else str(value)
