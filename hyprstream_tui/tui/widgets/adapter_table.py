"""The adapters of one model with their training state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.text import Text

from hyprstream_tui.tui.widgets.keyed_table import KeyedTable

STATE_STYLE = {"training": "bold green", "loading": "yellow", "stopping": "yellow", "idle": "dim", "failed": "red"}


@dataclass(frozen=True)
class AdapterRow:
    uuid: str
    name: str
    state: str
    step: int | None
    samples: int | None = None


class AdapterTable(KeyedTable):
    COLUMNS = ("Adapter", "State", "Step")

    def show(self, rows: Sequence[AdapterRow], *, select: str | None = None) -> None:
        self.fill(((r.uuid, self._cells(r)) for r in rows), select=select)

    def set_state(self, uuid: str, state: str, step: int | None) -> None:
        if uuid in self.rows:
            cols = self.ordered_columns
            self.update_cell(uuid, cols[1].key, Text(state, style=STATE_STYLE.get(state, "")))
            self.update_cell(uuid, cols[2].key, "" if step is None else str(step))

    @staticmethod
    def _cells(r: AdapterRow) -> tuple:
        return (r.name, Text(r.state, style=STATE_STYLE.get(r.state, "")), "" if r.step is None else str(r.step))
