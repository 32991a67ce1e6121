"""Training: the adapters of a model with their state; create an adapter; add samples (form or
JSONL file); start, stop and resume; a live plot of loss and lr; step, ETA, throughput, the last
checkpoint and the checkpoint list. Jobs run in thread workers; their events go through a buffer
that a timer drains a few times a second, so a fast loop never floods the UI."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Select, Static
from textual.worker import Worker, WorkerState

from hyprstream_tui import units
from hyprstream_tui.errors import HyprError
from hyprstream_tui.tui import format as fmt
from hyprstream_tui.tui.batch import UI_HZ, Buffer
from hyprstream_tui.tui.compare import metric_curve
from hyprstream_tui.tui.messages import TargetChanged
from hyprstream_tui.tui.screens.base import HyprScreen
from hyprstream_tui.tui.screens.dialogs import Field, FormDialog, TextDialog, when_given
from hyprstream_tui.tui.screens.training_forms import check_adapter, check_sample, check_train
from hyprstream_tui.tui.widgets.adapter_table import AdapterRow, AdapterTable
from hyprstream_tui.tui.widgets.loss_plot import LossPlot

if TYPE_CHECKING:
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.defaults import TrainDefaults
    from hyprstream_tui.engine.train.job import TrainEvent, TrainFinished, TrainStatus
    from hyprstream_tui.store.types import CommitInfo

METRICS = "metrics/steps.jsonl"


@dataclass
class Job:
    """One training run started from this screen: its cancel token and what it last reported."""

    model: str
    uuid: str
    name: str
    cancel: threading.Event = field(default_factory=threading.Event)
    events: Buffer[TrainEvent] = field(default_factory=Buffer)
    state: str = "loading"
    step: int | None = None
    target: int | None = None
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    steps_seen: int = 0
    ranks: tuple[tuple[int, float, float, int], ...] = ()  # a group's: (rank, loss share, tokens/s, pid)
    processes: int = 1


@dataclass
class Selected:
    model: str
    uuid: str
    name: str
    checkpoints: list[CommitInfo] = field(default_factory=list)
    curve: list[tuple[int, float, float | None]] = field(default_factory=list)  # (step, loss, lr)
    samples: int = 0
    status: TrainStatus | None = None


class TrainingScreen(HyprScreen):
    MODE_TITLE = "Training"
    MODE = "training"
    AUTO_FOCUS = "#train-adapters"
    BINDINGS = [
        Binding("n", "new_adapter", "New"),
        Binding("a", "add_sample", "Sample"),
        Binding("f", "samples_file", "Samples from a JSONL file", show=False),
        Binding("s", "start", "Start"),
        Binding("x", "stop", "Stop"),
        Binding("l", "show_samples", "Show samples", show=False),
        Binding("h", "history", "History of this adapter", show=False),
        Binding("c", "chat", "Chat with this adapter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.model: str | None = None
        self.jobs: dict[str, Job] = {}  # uuid -> running job
        self.selected: Selected | None = None
        self.adapters: dict[str, AdapterRow] = {}
        self._job_workers: dict[Worker, Job] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="train-body"):
            with Vertical(id="train-left"):
                yield Select([], prompt="model", id="train-model", compact=True)
                yield AdapterTable(id="train-adapters")
                yield Static("", id="train-samples", markup=False)
            with Vertical(id="train-right"):
                yield Static("Select or create an adapter (n).", id="train-status", markup=False)
                yield LossPlot(title="loss", id="train-plot")
                yield DataTable(id="train-checkpoints", cursor_type="row")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#train-checkpoints", DataTable).add_columns("step", "commit", "loss", "tags")
        self.set_interval(1 / UI_HZ, self._drain)
        self._retarget()

    def on_mode_entered(self) -> None:
        self._retarget()

    def on_target_changed(self, _event: TargetChanged) -> None:
        self._retarget()

    def _retarget(self, select: str | None = None) -> None:
        target = self.hypr.take_target("training")
        if target is not None:
            self.model, select = target.model, target.adapter
        self.load(self.model, select)

    @property
    def table(self) -> AdapterTable:
        return self.query_one(AdapterTable)

    # ---- loading -------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="train-load")
    def load(self, model: str | None, select: str | None = None) -> None:
        b = self.backend
        models = [m.name for m in b.list_models()]
        if model not in models:
            model = models[0] if models else None
        rows = []
        if model is not None:
            for a in b.list_adapters(model):
                running = b.is_training(model, a.uuid)
                step = next((c.step for c in b.log(model, a.uuid) if c.step is not None), None)
                rows.append(AdapterRow(uuid=a.uuid, name=a.name, state="training" if running else "idle", step=step))
                if select == a.name:
                    select = a.uuid
        self.app.call_from_thread(self._show_adapters, models, model, rows, select)

    def _show_adapters(self, models: list[str], model: str | None, rows: list[AdapterRow], select: str | None) -> None:
        self.model = model
        with self.prevent(Select.Changed):
            picker = self.query_one("#train-model", Select)
            picker.set_options([(m, m) for m in models])
            if model:
                picker.value = model
        self.adapters = {r.uuid: r for r in rows}
        for r in rows:
            if r.uuid in self.jobs:
                job = self.jobs[r.uuid]
                self.adapters[r.uuid] = AdapterRow(r.uuid, r.name, job.state, job.step)
        self.table.show(list(self.adapters.values()), select=select)
        if not rows:
            self.selected = None
            self._status(Text("No adapters yet: press n to create one." if model else "No models yet (F1)."))
            self.query_one(LossPlot).clear_series()
        else:
            self.load_adapter(self.model, self.table.selected)

    @on(Select.Changed, "#train-model")
    def _model_changed(self, event: Select.Changed) -> None:
        if event.value != Select.NULL and event.value != self.model:
            self.load(str(event.value))

    @on(DataTable.RowHighlighted, "#train-adapters")
    def _adapter_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and self.model and (self.selected is None or self.selected.uuid != event.row_key.value):
            self.load_adapter(self.model, event.row_key.value)

    @work(thread=True, exclusive=True, exit_on_error=False, group="train-adapter")
    def load_adapter(self, model: str | None, uuid: str | None) -> None:
        if model is None or uuid is None:
            return
        b = self.backend
        log = b.log(model, uuid)
        tip = log[0].sha if log else b.store.resolve_adapter(model, uuid).tip
        name = self.adapters[uuid].name if uuid in self.adapters else uuid
        sel = Selected(model=model, uuid=uuid, name=name, checkpoints=[c for c in log if c.kind in ("checkpoint", "rollback")],
                       curve=metric_curve(b.read_text(model, tip, METRICS)), samples=len(b.samples(model, tip)),
                       status=b.train_status(model, uuid))
        self.app.call_from_thread(self._show_selected, sel)

    def _show_selected(self, sel: Selected) -> None:
        previous = self.selected
        self.selected = sel
        plot = self.query_one(LossPlot)
        if previous is None or previous.uuid != sel.uuid or sel.uuid not in self.jobs:
            plot.clear_series()
            plot.set_series("loss", [(step, loss) for step, loss, _lr in sel.curve])
            plot.set_series("lr", [(step, lr) for step, _loss, lr in sel.curve if lr is not None], side="right")
        checkpoints = self.query_one("#train-checkpoints", DataTable)
        checkpoints.clear()
        for c in sel.checkpoints:
            checkpoints.add_row("" if c.step is None else str(c.step), c.short, units.metric(c.metrics.get("loss")),
                                ", ".join(c.tags), key=c.sha)
        self.query_one("#train-samples", Static).update(f"{sel.samples} samples · a adds one, f a JSONL file")
        self._render_status()

    # ---- the live part ---------------------------------------------------------------------------
    def _drain(self) -> None:
        """Apply what the jobs reported since the last tick: one update per widget."""
        for job in list(self.jobs.values()):
            events = job.events.drain()
            if not events:
                continue
            points, lrs = self._apply(job, events)
            self.table.set_state(job.uuid, job.state, job.step)
            if self.selected is not None and self.selected.uuid == job.uuid:
                if points:
                    plot = self.query_one(LossPlot)
                    plot.add_points("loss", points)
                    plot.add_points("lr", lrs, side="right")
                self._render_status()

    def _apply(self, job: Job, events: list[TrainEvent]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        from hyprstream_tui.engine.train.job import CheckpointCommitted, TrainFinished, TrainStarted, TrainStep

        points, lrs = [], []
        for e in events:
            if isinstance(e, TrainStarted):
                job.state, job.step, job.target, job.processes = "training", e.step, e.target, e.processes
            elif isinstance(e, TrainStep):
                job.steps_seen += 1
                job.step, job.target, job.loss, job.lr = e.step, e.target, e.loss, e.lr
                job.tokens_per_s, job.eta_s, job.ranks = e.tokens_per_s, e.eta_s, e.ranks
                points.append((e.step, e.loss))
                lrs.append((e.step, e.lr))
            elif isinstance(e, CheckpointCommitted):
                job.last_checkpoint, job.last_checkpoint_step = e.commit, e.step
                if self.selected is not None and self.selected.uuid == job.uuid:
                    self.load_adapter(job.model, job.uuid)
            elif isinstance(e, TrainFinished):
                job.state = "stopped" if e.stopped else "done"
        return points, lrs

    def _status(self, text: Text | str) -> None:
        self.query_one("#train-status", Static).update(text)

    def _render_status(self) -> None:
        sel = self.selected
        if sel is None:
            return
        job = self.jobs.get(sel.uuid)
        if job is not None:
            eta = units.eta(job.eta_s)
            line = Text.assemble((f"{sel.name}", "bold"), f"  {job.state}  step {job.step or 0}/{job.target or '?'}",
                                 f"  loss {units.metric(job.loss)}  lr {units.metric(job.lr)}",
                                 f"  {job.tokens_per_s or 0:.0f} tok/s  ETA {eta}")
            if job.processes > 1:  # the group: each rank's throughput, summed above
                each = ", ".join(f"rank {r} {tps:.0f}" for r, _loss, tps, _pid in job.ranks) or "starting"
                line.append(f"\n{job.processes} processes: {each} tok/s")
            ckpt = job.last_checkpoint
            line.append(f"\nlast checkpoint {ckpt[:7]} (step {job.last_checkpoint_step})" if ckpt else "\nno checkpoint yet")
        else:
            st = sel.status
            last = sel.checkpoints[0] if sel.checkpoints else None
            step = last.step if last and last.step is not None else 0
            group = f", {st.processes} ranks" if st and st.running and st.processes else ""
            line = Text.assemble((sel.name, "bold"), "  idle" if not (st and st.running) else f"  training (another process{group})",
                                 f"  step {step}", f"  loss {units.metric(last.metrics.get('loss')) if last else '-'}")
            line.append(f"\nlast checkpoint {last.short} · {last.summary}" if last else "\nno checkpoint yet: s starts training")
        self._status(line)

    # ---- actions -------------------------------------------------------------------------------
    def _need_model(self) -> bool:
        if self.model is None:
            self.notify("No model: import one or build the demo on the Models screen (F1).", severity="warning")
            return False
        return True

    def _need_adapter(self) -> Selected | None:
        if self.selected is None:
            self.notify("Select an adapter first, or create one with n.", severity="warning")
        return self.selected

    def action_new_adapter(self) -> None:
        if not self._need_model():
            return
        fields = [Field("name", "Name", placeholder="my-adapter"), Field("rank", fmt.setting_label("rank"), "8"),
                  Field("alpha", fmt.setting_label("alpha"), "16")]
        self.app.push_screen(FormDialog(f"New adapter on {self.model}", fields, submit="Create", check=check_adapter),
                             when_given(lambda v: self.create_adapter(self.model, v)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="train-write")
    def create_adapter(self, model: str, values: dict[str, Any]) -> None:
        info = self.backend.create_adapter(model, values["name"], rank=values["rank"], alpha=values["alpha"])
        self.app.call_from_thread(self.notify, f"Created adapter {info.name!r}: add samples with a, then s to train.")
        self.app.call_from_thread(self.load, model, info.uuid)

    def action_add_sample(self) -> None:
        sel = self._need_adapter()
        if sel is None:
            return
        fields = [Field("input", "Prompt"), Field("output", "Answer to learn", multiline=True)]
        self.app.push_screen(FormDialog(f"Add a sample to {sel.name}", fields, submit="Add", check=check_sample),
                             when_given(lambda row: self.add_samples(sel.model, sel.uuid, [row])))

    @work(thread=True, exclusive=False, exit_on_error=False, group="train-samples")
    def add_samples(self, model: str, uuid: str, rows: list[dict[str, str]]) -> None:
        total = self.backend.add_samples(model, uuid, rows)
        self.app.call_from_thread(self.notify, f"Added {len(rows)}; the adapter has {total} samples.")
        self.app.call_from_thread(self.load_adapter, model, uuid)

    def action_samples_file(self) -> None:
        sel = self._need_adapter()
        if sel is None:
            return
        fields = [Field("path", "JSONL file (input/output or messages per line)", placeholder="~/samples.jsonl")]
        self.app.push_screen(FormDialog(f"Add samples to {sel.name}", fields, submit="Add"),
                             when_given(lambda v: self.samples_file(sel.model, sel.uuid, v["path"])))

    @work(thread=True, exclusive=False, exit_on_error=False, group="train-samples")
    def samples_file(self, model: str, uuid: str, path: str) -> None:
        rows = self.backend.samples_from_file(path)
        total = self.backend.add_samples(model, uuid, rows)
        self.app.call_from_thread(self.notify, f"Added {len(rows)} samples; the adapter has {total}.")
        self.app.call_from_thread(self.load_adapter, model, uuid)

    def action_show_samples(self) -> None:
        sel = self._need_adapter()
        if sel is not None:
            self.show_samples(sel.model, sel.uuid, sel.name)

    @work(thread=True, exclusive=True, exit_on_error=False, group="train-read")
    def show_samples(self, model: str, uuid: str, name: str) -> None:
        import json

        tip = self.backend.store.resolve_adapter(model, uuid).tip
        rows = self.backend.samples(model, tip)
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) or "No samples yet."
        self.app.call_from_thread(self.app.push_screen, TextDialog(f"Samples of {name}", text))

    def action_start(self) -> None:
        sel = self._need_adapter()
        if sel is not None:
            self.open_train_form(sel)

    @work(thread=True, exclusive=True, exit_on_error=False, group="train-form")
    def open_train_form(self, sel: Selected) -> None:
        """The train form, filled with what `lora train start` would use when given nothing (the
        engine's rule); where the rule cannot tell, the fields stay blank and the note says why."""
        try:
            defaults, note = self.backend.train_defaults(sel.model, sel.uuid), ""
        except HyprError as exc:
            defaults, note = None, exc.worded(fmt.setting_label)
        self.app.call_from_thread(self._push_train_form, sel, defaults, note)

    def _push_train_form(self, sel: Selected, defaults: TrainDefaults | None, note: str) -> None:
        steps, lr = (str(defaults.steps), f"{defaults.learning_rate:g}") if defaults else ("", "")
        label = fmt.setting_label  # the words an error about one of these fields uses too
        fields = [Field("steps", label("steps"), steps, placeholder="automatic"),
                  Field("learning_rate", label("learning_rate"), lr, placeholder="automatic"),
                  Field("batch_size", label("batch_size"), str(defaults.batch_size) if defaults else "4"),
                  Field("checkpoint_every", label("checkpoint_every"), "20"),
                  Field("processes", label("processes"), "1", placeholder="1: one process; N: torch.distributed"),
                  Field("new_run", "Start a new run even if one was stopped part-way (y/n)", "n")]
        self.app.push_screen(FormDialog(f"Train {sel.name}", fields, submit="Start", check=check_train,
                                        note=defaults.reason if defaults else note),
                             when_given(lambda config: self.start_training(sel, config)))

    def start_training(self, sel: Selected, config: TrainConfig) -> None:
        if sel.uuid in self.jobs:
            self.hypr.show_error(f"Adapter {sel.name!r} of {sel.model!r} is training already: follow it here, or "
                                 "stop it with x before starting again.")
            return
        job = Job(model=sel.model, uuid=sel.uuid, name=sel.name)
        self.jobs[sel.uuid] = job
        self.table.set_state(sel.uuid, "loading", None)
        self._render_status()
        self._job_workers[self.train(job, config)] = job

    @work(thread=True, exclusive=False, exit_on_error=False, group="train")
    def train(self, job: Job, config: TrainConfig) -> TrainFinished:
        return self.backend.train(job.model, job.uuid, config, on_event=job.events.push, cancel=job.cancel,
                                  name=job.name)

    def worker_finished(self, worker: Worker, state: WorkerState) -> None:
        if worker.group != "train":
            return
        self._job_ended(self._job_workers.pop(worker, None), state)

    def _job_ended(self, job: Job | None, state: WorkerState) -> None:
        if job is None or self.jobs.get(job.uuid) is not job:
            return  # a second start of a running adapter: its error is shown, the first job goes on
        self._drain()
        del self.jobs[job.uuid]
        if state == WorkerState.SUCCESS:
            self.notify(f"Training of {job.name!r} {'stopped' if job.state == 'stopped' else 'finished'} "
                        f"at step {job.step}.")
        self.load(job.model, self.selected.uuid if self.selected else job.uuid)

    def action_stop(self) -> None:
        sel = self._need_adapter()
        if sel is None:
            return
        job = self.jobs.get(sel.uuid)
        if job is None:
            self.stop_other(sel.model, sel.uuid)
            return
        job.cancel.set()
        job.state = "stopping"
        self.table.set_state(job.uuid, "stopping", job.step)
        self._render_status()

    @work(thread=True, exclusive=True, exit_on_error=False, group="train-stop")
    def stop_other(self, model: str, uuid: str) -> None:
        """Stop a run started elsewhere (the CLI): it finishes its step and commits."""
        self.backend.request_stop(model, uuid)
        self.app.call_from_thread(self.notify, "Asked the other process to stop after its current step.")

    def action_history(self) -> None:
        if self.selected:
            self.hypr.open_history(self.selected.model, self.selected.uuid)

    def action_chat(self) -> None:
        if self.selected:
            self.hypr.open_chat(self.selected.model, self.selected.name)
