"""The table of models in the store: one row per model, keyed by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from textual.widgets import DataTable

from hyprstream_tui import units

if TYPE_CHECKING:
    from hyprstream_tui.store.types import ModelSummary


class ModelTable(DataTable):
    COLUMNS = ("Name", "Architecture", "Params", "Dtype", "Size", "Adapters")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self.add_columns(*self.COLUMNS)

    def show(self, models: Sequence["ModelSummary"], *, select: str | None = None) -> None:
        current = select or self.selected
        self.clear()
        for m in models:
            self.add_row(m.name, m.architecture, units.count(m.parameters), m.dtype, units.size(m.size_bytes),
                         str(m.adapters), key=m.name)
        names = [m.name for m in models]
        if current in names:
            self.move_cursor(row=names.index(current))

    @property
    def selected(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - an empty or shrinking table has no cursor row
            return None
