"""History: the commit graph of an adapter (or all adapters of a model) with step, loss and tags;
mark two commits to compare (loss curves overlaid, per-layer LoRA change), tag a milestone, roll
back (a new commit, after confirmation), chat with any commit."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Select, Static

from hyprstream_tui import names, units
from hyprstream_tui.tui import format as fmt
from hyprstream_tui.tui.messages import TargetChanged
from hyprstream_tui.tui.screens.base import HyprScreen
from hyprstream_tui.tui.screens.dialogs import ConfirmDialog, Field, FormDialog, when_given
from hyprstream_tui.tui.widgets.commit_graph import CommitGraph, GraphRow, build_rows
from hyprstream_tui.tui.widgets.loss_plot import LossPlot

ALL = "*"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
METRICS = "metrics/steps.jsonl"


@dataclass
class Loaded:
    models: list[str]
    model: str | None
    adapters: list = field(default_factory=list)
    adapter: str | None = None  # uuid, or ALL
    rows: list[GraphRow] = field(default_factory=list)


def _check_tag(values: dict[str, str]) -> str:
    return names.tag_label(values["label"].strip())


class HistoryScreen(HyprScreen):
    MODE_TITLE = "History"
    MODE = "history"
    AUTO_FOCUS = "#history-commits"
    BINDINGS = [
        Binding("space", "mark", "Mark"),
        Binding("v", "compare", "Compare the two marked commits", show=False),
        Binding("t", "tag", "Tag"),
        Binding("b", "rollback", "Roll back"),
        Binding("c", "chat", "Chat with this commit", show=False),
        Binding("C", "chat_compare", "Chat with the two marked commits side by side", show=False),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.model: str | None = None
        self.adapter: str | None = None  # uuid or ALL
        self._select_after: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="history-pickers", classes="pickers"):
            yield Select([], prompt="model", id="history-model", allow_blank=True, compact=True)
            yield Select([], prompt="adapter", id="history-adapter", allow_blank=True, compact=True)
        yield CommitGraph(id="history-commits")
        with Horizontal(id="history-lower"):
            with VerticalScroll(id="history-detail"):
                yield Static("Select a commit. Space marks two commits to compare.", id="history-detail-body")
            yield LossPlot(title="loss", id="history-plot")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self._retarget()

    def on_mode_entered(self) -> None:
        self._retarget()

    def on_target_changed(self, _event: TargetChanged) -> None:
        self._retarget()

    def _retarget(self) -> None:
        target = self.hypr.take_target("history")
        if target is not None:
            self.model, self.adapter = target.model, target.adapter
        self.load(self.model, self.adapter)

    @property
    def graph(self) -> CommitGraph:
        return self.query_one(CommitGraph)

    # ---- loading -------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="history-load")
    def load(self, model: str | None, adapter: str | None, select: str | None = None) -> None:
        b = self.backend
        models = [m.name for m in b.list_models()]
        if model not in models:
            model = models[0] if models else None
        loaded = Loaded(models=models, model=model)
        if model is not None:
            loaded.adapters = b.list_adapters(model)
            chosen = [a for a in loaded.adapters if adapter in (a.uuid, a.name)]
            if adapter != ALL and not chosen:
                chosen = loaded.adapters[:1]
            loaded.adapter = ALL if adapter == ALL else (chosen[0].uuid if chosen else None)
            shown = loaded.adapters if loaded.adapter == ALL else chosen
            loaded.rows = build_rows([(a, b.log(model, a.uuid)) for a in shown])
        self.app.call_from_thread(self._show, loaded, select)

    def _show(self, loaded: Loaded, select: str | None) -> None:
        self.model, self.adapter = loaded.model, loaded.adapter
        with self.prevent(Select.Changed):
            model_select = self.query_one("#history-model", Select)
            model_select.set_options([(m, m) for m in loaded.models])
            if loaded.model:
                model_select.value = loaded.model
            adapter_select = self.query_one("#history-adapter", Select)
            options = [(a.name, a.uuid) for a in loaded.adapters]
            if len(options) > 1:
                options.append(("all adapters", ALL))
            adapter_select.set_options(options)
            if loaded.adapter:
                adapter_select.value = loaded.adapter
        self.graph.show(loaded.rows, select=select)
        if not loaded.rows:
            self.query_one(LossPlot).clear_series()
            self._detail(Text("No adapters yet: create one on the Training screen (F3)." if loaded.model
                              else "No models yet: see the Models screen (F1)."))
        elif self._comparing():
            self.action_compare()
        else:
            self._describe(self.graph.selected_row)

    @on(Select.Changed, "#history-model")
    def _model_changed(self, event: Select.Changed) -> None:
        if event.value != Select.NULL and event.value != self.model:
            self.load(str(event.value), None)

    @on(Select.Changed, "#history-adapter")
    def _adapter_changed(self, event: Select.Changed) -> None:
        if event.value != Select.NULL and event.value != self.adapter:
            self.load(self.model, str(event.value))

    @on(DataTable.RowHighlighted, "#history-commits")
    def _highlighted(self, _event: DataTable.RowHighlighted) -> None:
        if not self._comparing():
            self._describe(self.graph.selected_row)

    def _detail(self, renderable) -> None:
        self.query_one("#history-detail-body", Static).update(renderable)

    def _describe(self, row: GraphRow | None) -> None:
        """One commit: its metrics in the detail pane, its loss curve in the plot."""
        if row is None:
            return
        c = row.commit
        table = Table.grid(padding=(0, 2))
        for key, value in c.metrics.items():
            table.add_row(Text(key, style="dim"), Text(fmt.commit_metric(key, value)))
        head = Text.assemble((c.short, "yellow"), "  ", (row.adapter.name, "bold"), f"  {units.when(c.time)}\n",
                             c.summary, ("\n" + ", ".join(c.tags) if c.tags else "", "cyan"))
        self._detail(Group(head, table))
        self.curve(row)

    def _comparing(self) -> bool:
        return len(self.graph.marked) == 2

    @work(thread=True, exclusive=True, exit_on_error=False, group="history-curve")
    def curve(self, row: GraphRow) -> None:
        from hyprstream_tui.tui.compare import loss_curve

        points = loss_curve(self.backend.read_text(row.adapter.model, row.commit.sha, METRICS))
        self.app.call_from_thread(self._show_curve, row, points)

    def _show_curve(self, row: GraphRow, points: list[tuple[int, float]]) -> None:
        if self._comparing() or self.graph.selected != row.commit.sha:
            return  # the cursor moved on, or two commits are marked: that plot wins
        plot = self.query_one(LossPlot)
        plot.clear_series()
        plot.set_series(row.commit.short, points)

    # ---- actions -------------------------------------------------------------------------------
    def action_refresh(self) -> None:
        self.load(self.model, self.adapter)

    def action_mark(self) -> None:
        marked = self.graph.toggle_mark()
        if len(marked) == 2:
            self.action_compare()
        else:  # back to one commit: its detail and curve
            self._describe(self.graph.selected_row)

    def action_compare(self) -> None:
        marked = self.graph.marked
        if len(marked) != 2 or self.model is None:
            self.notify("Mark two commits with space to compare them.", severity="warning")
            return
        first, second = (self.graph.rows_by_sha[s] for s in marked)
        self.compare(self.model, first, second)

    @work(thread=True, exclusive=True, exit_on_error=False, group="history-compare")
    def compare(self, model: str, first: GraphRow, second: GraphRow) -> None:
        from hyprstream_tui.tui.compare import layer_changes, loss_curve

        b = self.backend
        curves = [(row, loss_curve(b.read_text(model, row.commit.sha, METRICS))) for row in (first, second)]
        changes = layer_changes(b.read_bytes(model, first.commit.sha, ADAPTER_WEIGHTS),
                                b.read_bytes(model, second.commit.sha, ADAPTER_WEIGHTS))
        self.app.call_from_thread(self._show_compare, first, second, curves, changes)

    def _show_compare(self, first: GraphRow, second: GraphRow, curves, changes) -> None:
        if self.graph.marked != [first.commit.sha, second.commit.sha]:
            return  # a mark changed while the comparison was read
        plot = self.query_one(LossPlot)
        plot.clear_series()
        for row, points in curves:
            plot.set_series(f"{row.commit.short}", points)
        table = Table("module", f"|ΔW| {first.commit.short}", f"|ΔW| {second.commit.short}", "change", box=None,
                      padding=(0, 1), header_style="dim")
        for ch in changes:
            table.add_row(ch.module, f"{ch.norm_a:.4f}", f"{ch.norm_b:.4f}", f"{ch.change:.4f}")
        head = Text.assemble("Compare ", (first.commit.short, "yellow"), " → ", (second.commit.short, "yellow"),
                             f"\nloss {units.metric(first.commit.metrics.get('loss'))} → "
                             f"{units.metric(second.commit.metrics.get('loss'))}\n")
        note = Text("" if changes else "No LoRA weights at these commits yet.", style="dim")
        self._detail(Group(head, table, note))

    def action_tag(self) -> None:
        row = self.graph.selected_row
        if row is None:
            return
        title = f"Tag {row.commit.short} of {row.adapter.name} as {row.adapter.name}/<label>"
        self.app.push_screen(FormDialog(title, [Field("label", "Label", placeholder="good")], submit="Tag",
                                        check=_check_tag), when_given(lambda label: self.tag(row, label)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="history-write")
    def tag(self, row: GraphRow, label: str) -> None:
        name = self.backend.tag(row.adapter.model, row.adapter.uuid, label, row.commit.sha)
        self.app.call_from_thread(self.notify, f"Tagged {row.commit.short} as {name}.")
        self.app.call_from_thread(self.load, self.model, self.adapter, row.commit.sha)

    def action_rollback(self) -> None:
        row = self.graph.selected_row
        if row is None:
            return
        what = f"step {row.commit.step}" if row.commit.step is not None else "this commit"
        question = (f"Roll back adapter {row.adapter.name!r} to {what} ({row.commit.short})? A new commit with that "
                    "checkpoint's files is added on top; no history is lost.")
        self.app.push_screen(ConfirmDialog(question, title="Roll back", yes="Roll back"),
                             when_given(lambda _yes: self.rollback(row)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="history-write")
    def rollback(self, row: GraphRow) -> None:
        new = self.backend.rollback(row.adapter.model, row.adapter.uuid, row.commit.sha)
        self.app.call_from_thread(self.notify, f"{new.summary}: new commit {new.short}.")
        self.app.call_from_thread(self.load, self.model, self.adapter, new.sha)

    def action_chat_compare(self) -> None:
        marked = [self.graph.rows_by_sha[s] for s in self.graph.marked]
        if len(marked) != 2:
            self.notify("Mark two commits with space, then C answers each prompt with both.", severity="warning")
            return
        first, second = marked
        other = f"{second.adapter.model}:{second.adapter.name}@{second.commit.sha}"
        self.hypr.open_chat(first.adapter.model, first.adapter.name, first.commit.sha, compare=other)

    def action_chat(self) -> None:
        row = self.graph.selected_row
        if row is not None:
            self.hypr.open_chat(row.adapter.model, row.adapter.name, row.commit.sha)
