"""A DataTable of rows keyed by an id, with its columns in place before any row arrives.

The columns used to be added in `on_mount`. Under load a `show` could run first (its data came
from a worker), and columns added after the rows take the width of their header: a snapshot
showed "tiny" for "tiny-demo" and "Qwen2ForCaus" for "Qwen2ForCausalLM". Here the columns are
added the first time either happens.
"""

from __future__ import annotations

from typing import Any, Iterable

from textual.widgets import DataTable


class KeyedTable(DataTable[Any]):
    COLUMNS: tuple[str, ...] = ()
    ZEBRA = False

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = self.ZEBRA
        self.ensure_columns()

    def ensure_columns(self) -> None:
        if not self.columns:
            self.add_columns(*self.COLUMNS)

    def fill(self, rows: Iterable[tuple[str, tuple[Any, ...]]], *, select: str | None = None) -> None:
        """Replace every row with `rows` ((key, cells) pairs); keep the cursor on `select`, else
        on the row it was on."""
        current = select or self.selected
        self.ensure_columns()
        self.clear()
        keys = []
        for key, cells in rows:
            self.add_row(*cells, key=key)
            keys.append(key)
        if current in keys:
            self.move_cursor(row=keys.index(current))

    @property
    def selected(self) -> str | None:
        """The key of the row under the cursor (None: an empty table)."""
        if self.row_count == 0:
            return None
        try:
            value = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - an empty or shrinking table has no cursor row
            return None
        return value
