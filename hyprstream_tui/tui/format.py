"""What only the TUI words its own way: commit trailers, and the settings an error names.

Sizes, counts, times and durations come from `hyprstream_tui.units`, as in the CLI.
"""

from __future__ import annotations

from typing import Any

from hyprstream_tui import units

DURATION_METRICS = frozenset({"elapsed"})  # commit trailers that count seconds


def commit_metric(key: str, value: Any) -> str:
    """A commit trailer's value: seconds as a duration (`elapsed 11m34s`), other numbers as `metric`."""
    if key in DURATION_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return units.duration(value)
    return units.metric(value)


# A setting as the TUI's forms label it (where the label is not just its name in words).
SETTING_LABELS = {
    "steps": "Steps in this run",
    "checkpoint_every": "Checkpoint every N steps",
    "max_seq_len": "Max sequence length",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha",
    "new_run": "New run",
    "input": "Prompt",
    "output": "Answer to learn",
    "file": "JSONL file",
}


def setting_label(setting: str) -> str:
    """How the TUI names a setting an error is about (`learning_rate` -> `Learning rate`): the
    label of its form field, where it has one, never a CLI flag."""
    return SETTING_LABELS.get(setting) or setting.replace("_", " ").capitalize()
