"""`hyprstream_tui.units`: one style for sizes, counts, durations and ETAs, the same in the CLI and
the TUI, and importable from every layer (standard library only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hyprstream_tui import units

PACKAGE = Path(__file__).resolve().parents[1] / "hyprstream_tui"


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1_500_000, "1.5 MB"),
                                     (2_345_678_901, "2.3 GB"), (5e15, "5000.0 TB")])
def test_size(n, text):
    assert units.size(n) == text


@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1000, "1.0K"), (494_032_768, "494.0M"),
                                     (1_500_000_000, "1.5B"), (2e12, "2000.0B")])
def test_count(n, text):
    assert units.count(n) == text


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (41.6, "42s"), (62, "1m02s"), (694, "11m34s"),
                                           (3720, "1h02m"), (-5, "0s")])
def test_duration(seconds, text):
    assert units.duration(seconds) == text


def test_eta_is_a_duration_or_a_dash():
    assert units.eta(62) == units.duration(62) == "1m02s"
    assert units.eta(None) == units.eta(float("nan")) == units.eta(float("inf")) == "-"


def test_when_and_metric():
    assert units.when(1714566840) == "2024-05-01 12:34"
    assert units.metric(0.123456) == "0.1235" and units.metric(0.00031) == "3.10e-04" and units.metric(0.0) == "0.0000"
    assert units.metric(None) == "" and units.metric(7) == "7"


def test_the_cli_shows_times_in_the_same_style():
    """`lora train start`'s view and the byte progress bars: ETA and elapsed as `units` writes them
    (the TUI's Training screen shows `units.eta` too), not rich's `0:01:02`."""
    from rich.progress import Progress

    from hyprstream_tui.cli.progress import ElapsedColumn, RemainingColumn
    from hyprstream_tui.cli.train import TrainView
    from hyprstream_tui.engine.train.job import TrainStep

    with TrainView("qa") as view:
        view(TrainStep(step=3, target=10, loss=1.25, lr=3e-4, tokens_per_s=1234.0, epoch=0, elapsed=5.0, eta_s=62.0))
        fields = view.progress.tasks[0].fields
    assert (fields["eta"], fields["loss"], fields["tps"]) == ("1m02s", "1.2500", "1,234")
    with Progress(disable=True) as progress:
        task_id = progress.add_task("x", total=None, start=False)
        task = next(t for t in progress.tasks if t.id == task_id)
        assert str(ElapsedColumn().render(task)) == "-" and str(RemainingColumn().render(task)) == ""
        progress.update(task_id, total=100, completed=50)
        progress.start_task(task_id)
        assert str(ElapsedColumn().render(task)) == "0s"


def test_units_imports_only_the_standard_library():
    tree = ast.parse((PACKAGE / "units.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "math", "time"}


@pytest.mark.parametrize("text,expected", [("1500", 1500), ("500MB", 500_000_000), ("1.5 GB", 1_500_000_000),
                                           ("2g", 2_000_000_000), ("0", 0), ("1TB", 10**12), ("3kb", 3000)])
def test_parse_size_reads_what_size_writes(text, expected):
    assert units.parse_size(text) == expected
    assert units.parse_size(units.size(expected)) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("text", ["lots", "-1G", "1XB", "G", "nan", "inf", ""])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError):
        units.parse_size(text)
