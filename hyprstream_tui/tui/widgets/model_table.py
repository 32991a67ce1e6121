"""The table of models in the store: one row per model, keyed by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from hyprstream_tui import units
from hyprstream_tui.tui.widgets.keyed_table import KeyedTable

if TYPE_CHECKING:
    from hyprstream_tui.store.types import ModelSummary


class ModelTable(KeyedTable):
    COLUMNS = ("Name", "Architecture", "Params", "Dtype", "Size", "Adapters")
    ZEBRA = True

    def show(self, models: Sequence["ModelSummary"], *, select: str | None = None) -> None:
        self.fill(((m.name, (m.name, m.architecture, units.count(m.parameters), m.dtype,
                              units.size(m.size_bytes), str(m.adapters))) for m in models),
                  select=select)
