"""The detail pane of one model: config, files and their LFS objects, branches, tags, commits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from hyprstream_tui import units

if TYPE_CHECKING:
    from hyprstream_tui.store.types import ModelInfo


def _section(title: str) -> Text:
    return Text(title, style="bold underline")


def render_info(info: "ModelInfo") -> Group:
    s = info.summary
    head = Text.assemble((s.name, "bold"), f"  {s.architecture} · {units.count(s.parameters)} params · {s.dtype} · ",
                         f"{units.size(s.size_bytes)} · main {s.head[:7]}\n", ("source ", "dim"), s.source)
    config = Table.grid(padding=(0, 2))
    for key, value in info.config.items():
        config.add_row(Text(key, style="dim"), Text(str(value)))
    files = Table("file", "size", "stored as", box=None, padding=(0, 1), header_style="dim")
    for f in info.files:
        stored = (f"lfs {f.oid[:12]}" + ("" if f.present else " (missing)")) if f.lfs else f"git {f.oid[:7]}"
        files.add_row(f.path, units.size(f.size), stored)
    adapters = Text("\n".join(f"{a.name}  {a.branch}  tip {a.tip[:7]}" for a in info.adapters) or "none yet")
    refs = Text("branches: " + (", ".join(info.branches) or "-") + "\ntags: " + (", ".join(info.tags) or "-"))
    commits = Table.grid(padding=(0, 1))
    for c in info.commits:
        commits.add_row(Text(c.short, style="yellow"), Text(units.when(c.time), style="dim"), Text(c.summary))
    return Group(head, _section("Config"), config, _section("Files"), files, _section("Adapters"), adapters,
                 _section("Refs"), refs, _section("Commits"), commits)


class ModelDetail(VerticalScroll):
    can_focus = True
    shown: "ModelInfo | None" = None  # the model on display

    def compose(self):
        yield Static("Select a model to see its files, adapters and commits.", id="model-detail-body")

    def show(self, info: "ModelInfo | None", *, message: str = "") -> None:
        self.shown = info
        body = self.query_one("#model-detail-body", Static)
        body.update(render_info(info) if info is not None else Text(message))
