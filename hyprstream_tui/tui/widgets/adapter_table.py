"""The adapters of one model with their training state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.text import Text
from textual.widgets import DataTable

STATE_STYLE = {"training": "bold green", "loading": "yellow", "stopping": "yellow", "idle": "dim", "failed": "red"}


@dataclass(frozen=True)
class AdapterRow:
    uuid: str
    name: str
    state: str
    step: int | None
    samples: int | None = None


class AdapterTable(DataTable):
    COLUMNS = ("Adapter", "State", "Step")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS)

    def show(self, rows: Sequence[AdapterRow], *, select: str | None = None) -> None:
        current = select or self.selected
        self.clear()
        for r in rows:
            self.add_row(*self._cells(r), key=r.uuid)
        uuids = [r.uuid for r in rows]
        if current in uuids:
            self.move_cursor(row=uuids.index(current))

    def set_state(self, uuid: str, state: str, step: int | None) -> None:
        if uuid in self.rows:
            cols = self.ordered_columns
            self.update_cell(uuid, cols[1].key, Text(state, style=STATE_STYLE.get(state, "")))
            self.update_cell(uuid, cols[2].key, "" if step is None else str(step))

    @staticmethod
    def _cells(r: AdapterRow) -> tuple:
        return (r.name, Text(r.state, style=STATE_STYLE.get(r.state, "")), "" if r.step is None else str(r.step))

    @property
    def selected(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - empty table
            return None
