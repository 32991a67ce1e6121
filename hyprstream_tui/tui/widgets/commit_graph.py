"""The commit graph of one adapter branch, or of every adapter of a model side by side (one lane
per branch): step, loss and tags per commit; up to two commits can be marked for comparison."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from rich.text import Text

from hyprstream_tui import units
from hyprstream_tui.tui.widgets.keyed_table import KeyedTable

if TYPE_CHECKING:
    from hyprstream_tui.store.types import AdapterInfo, CommitInfo

KIND_STYLE = {"checkpoint": "green", "rollback": "magenta", "create": "cyan", "samples": "blue"}


@dataclass(frozen=True)
class GraphRow:
    lanes: str
    adapter: "AdapterInfo"
    commit: "CommitInfo"


def build_rows(logs: Sequence[tuple["AdapterInfo", Sequence["CommitInfo"]]]) -> list[GraphRow]:
    """Commits of several branches, newest first, with a lane per branch: ● the commit's branch,
    │ a branch with older commits still below, ┘ where a branch forks from main."""
    entries = []
    for lane, (adapter, commits) in enumerate(logs):
        for pos, commit in enumerate(commits):
            entries.append((-commit.time, lane, pos, adapter, commit))
    entries.sort(key=lambda e: e[:3])
    remaining = [len(commits) for _a, commits in logs]
    rows = []
    for _t, lane, _pos, adapter, commit in entries:
        remaining[lane] -= 1
        cells = []
        for other in range(len(logs)):
            if other == lane:
                cells.append("●")
            elif remaining[other] > 0 and remaining[other] < len(logs[other][1]):
                cells.append("│")
            else:
                cells.append(" ")
        rows.append(GraphRow("".join(cells), adapter, commit))
    return rows


class CommitGraph(KeyedTable):
    COLUMNS = ("", "graph", "commit", "step", "loss", "tags", "summary", "date")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows_by_sha: dict[str, GraphRow] = {}
        self.marked: list[str] = []

    def show(self, rows: Sequence[GraphRow], *, select: str | None = None) -> None:
        self.rows_by_sha = {r.commit.sha: r for r in rows}
        self.marked = [m for m in self.marked if m in self.rows_by_sha]
        self.fill(((r.commit.sha, self._cells(r)) for r in rows), select=select)

    def _cells(self, r: GraphRow) -> tuple:
        c = r.commit
        loss = c.metrics.get("loss")
        mark = "*" if c.sha in self.marked else ""
        return (mark, Text(r.lanes, style="bold"), Text(c.short, style="yellow"), "" if c.step is None else str(c.step),
                units.metric(loss) if loss is not None else "", Text(", ".join(c.tags), style="cyan"),
                Text(c.summary, style=KIND_STYLE.get(c.kind, "")), units.when(c.time))

    @property
    def selected_row(self) -> GraphRow | None:
        sha = self.selected
        return self.rows_by_sha.get(sha) if sha else None

    def toggle_mark(self) -> list[str]:
        sha = self.selected
        if sha is None:
            return self.marked
        if sha in self.marked:
            self.marked.remove(sha)
        else:
            self.marked = (self.marked + [sha])[-2:]
        for s in self.rows_by_sha:
            self.update_cell(s, self.ordered_columns[0].key, "*" if s in self.marked else "")
        return self.marked
