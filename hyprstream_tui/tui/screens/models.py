"""Models: the store's models in a table, details of the selected one, pull (with a live,
cancellable progress bar), import a folder, delete with confirmation, and the demo model offer."""

from __future__ import annotations

import threading

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import Worker, WorkerState

from hyprstream_tui import names, units
from hyprstream_tui.tui.batch import UI_HZ, Latest
from hyprstream_tui.tui.screens.base import HyprScreen
from hyprstream_tui.tui.screens.dialogs import ConfirmDialog, Field, FormDialog
from hyprstream_tui.tui.widgets.model_detail import ModelDetail
from hyprstream_tui.tui.widgets.model_table import ModelTable
from hyprstream_tui.tui.widgets.task_progress import TaskProgress

DEMO_QUESTION = ("There are no models yet. Build the tiny demo model now? It takes a few seconds, needs no "
                 "network, and is enough to try the whole loop: chat, add samples, train, roll back.")


def _check_pull(values: dict[str, str]) -> dict[str, str]:
    names.repo_id(values["repo"].strip())
    if values["name"].strip():
        names.model_name(values["name"].strip())
    names.revision(values["revision"].strip() or "main")
    return {k: v.strip() for k, v in values.items()}


def _check_import(values: dict[str, str]) -> dict[str, str]:
    from hyprstream_tui.errors import InvalidInput

    if not values["path"].strip():
        raise InvalidInput("Give a model folder (config.json and *.safetensors) or a .gguf file.")
    if values["name"].strip():
        names.model_name(values["name"].strip())
    return {k: v.strip() for k, v in values.items()}


class ModelsScreen(HyprScreen):
    MODE_TITLE = "Models"
    MODE = "models"
    AUTO_FOCUS = "#model-table"
    BINDINGS = [
        Binding("p", "pull", "Pull"),
        Binding("i", "import", "Import"),
        Binding("delete,D", "delete", "Delete", key_display="del"),
        Binding("x", "cancel_task", "Cancel", show=False),
        Binding("r", "refresh", "Refresh", show=False),
        Binding("c", "chat", "Chat"),
        Binding("t", "train", "Train", show=False),
        Binding("g", "demo", "Demo model", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._progress: Latest[tuple[str, int, int]] = Latest()  # (what, done, total)
        self._cancel = threading.Event()
        self._task_running = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="models-body"):
            yield ModelTable(id="model-table")
            yield ModelDetail(id="model-detail")
            yield TaskProgress(id="models-task")
        yield Static("", id="models-empty", classes="hint", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(1 / UI_HZ, self._tick_progress)
        if self.hypr.painted:  # else the app calls first_frame(): listing imports pygit2 (GIL) while it paints
            self.load_models()

    def first_frame(self) -> None:
        self.load_models()

    def on_mode_entered(self) -> None:
        self.load_models()

    @property
    def table(self) -> ModelTable:
        return self.query_one(ModelTable)

    # ---- loading -------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="models-list")
    def load_models(self, select: str | None = None) -> None:
        models = self.backend.list_models()
        self.app.call_from_thread(self._show_models, models, select)

    def _show_models(self, models: list, select: str | None) -> None:
        self.table.show(models, select=select)
        empty = self.query_one("#models-empty", Static)
        empty.update("" if models else "No models yet: press g for the demo model, p to pull, i to import a folder.")
        empty.set_class(not models, "visible")
        if models:
            self.load_detail(self.table.selected)
        else:
            self.query_one(ModelDetail).show(None, message="No model selected.")
            if not self.hypr.demo_offered and not self._task_running:
                self.hypr.demo_offered = True
                self.app.push_screen(ConfirmDialog(DEMO_QUESTION, title="Welcome to hyprstream", yes="Build demo"),
                                     self._demo_answer)

    @on(DataTable.RowHighlighted, "#model-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value:
            self.load_detail(event.row_key.value)

    @work(thread=True, exclusive=True, exit_on_error=False, group="models-detail")
    def load_detail(self, name: str | None) -> None:
        if name is None:
            return
        info = self.backend.model_info(name)
        self.app.call_from_thread(self.query_one(ModelDetail).show, info)

    # ---- long tasks: demo, pull, import, delete ------------------------------------------------
    def _begin(self, label: str) -> bool:
        if self._task_running:
            self.notify("Another model task is running: wait for it, or press x to cancel a pull.", severity="warning")
            return False
        self._task_running = True
        self._cancel.clear()
        self.query_one(TaskProgress).start(label)
        return True

    def worker_finished(self, worker: Worker, state: WorkerState) -> None:
        if worker.group == "models-task":
            self._task_running = False
            self.query_one(TaskProgress).finish()
            self.load_models(select=worker.result if state == WorkerState.SUCCESS else None)

    def _tick_progress(self) -> None:
        p = self._progress.take()
        if p is None:
            return
        label, done, total = p
        self.query_one(TaskProgress).advance_to(label, done, total)

    def _demo_answer(self, yes: bool | None) -> None:
        if yes:
            self.action_demo()

    def action_demo(self) -> None:
        if self._begin("Building the demo model (no network)…"):
            self.build_demo()

    @work(thread=True, exclusive=True, exit_on_error=False, group="models-task")
    def build_demo(self) -> str:
        summary = self.backend.build_demo()
        self.app.call_from_thread(self.notify, f"Demo model {summary.name!r} is ready: press c to chat with it.")
        return summary.name

    def action_pull(self) -> None:
        fields = [Field("repo", "Hub repository (ORG/NAME)", placeholder="Qwen/Qwen2.5-0.5B-Instruct"),
                  Field("name", "Local name (optional)"), Field("revision", "Revision", value="main")]
        self.app.push_screen(FormDialog("Pull a model", fields, submit="Pull", check=_check_pull), self._pull_answer)

    def _pull_answer(self, values: dict | None) -> None:
        if values and self._begin(f"Pulling {values['repo']}…"):
            self.pull(values["repo"], values["name"], values["revision"])

    @work(thread=True, exclusive=True, exit_on_error=False, group="models-task")
    def pull(self, repo: str, name: str, revision: str) -> str:
        def progress(p) -> None:
            label = f"{repo}: {p.relpath} ({p.index}/{p.count}) {units.size(p.bytes_done)} of {units.size(p.bytes_total)}"
            self._progress.set((label, p.bytes_done, p.bytes_total))

        summary = self.backend.pull_model(repo, name=name, revision=revision, progress=progress, cancel=self._cancel)
        self.app.call_from_thread(self.notify, f"Pulled {repo} as {summary.name!r}.")
        return summary.name

    def action_cancel_task(self) -> None:
        if self._task_running:
            self._cancel.set()
            self.notify("Cancelling: the files already downloaded are kept for the next pull.")

    def action_import(self) -> None:
        fields = [Field("path", "Model folder or .gguf file", placeholder="~/models/my-model or ~/models/model.Q4_K_M.gguf"),
                  Field("name", "Name (optional)")]
        self.app.push_screen(FormDialog("Import a model", fields, submit="Import", check=_check_import),
                             self._import_answer)

    def _import_answer(self, values: dict | None) -> None:
        if values and self._begin(f"Importing {values['path']}…"):
            self.import_folder(values["path"], values["name"])

    @work(thread=True, exclusive=True, exit_on_error=False, group="models-task")
    def import_folder(self, path: str, name: str) -> str:
        def progress(p) -> None:
            self._progress.set((f"Importing {p.file}", p.done, p.total))

        summary = self.backend.import_model(path, name=name, progress=progress)
        self.app.call_from_thread(self.notify, f"Imported {summary.name!r}.")
        return summary.name

    def action_delete(self) -> None:
        name = self.table.selected
        if name is None:
            return
        question = f"Delete model {name!r}, its adapters and their history? This cannot be undone."
        self.app.push_screen(ConfirmDialog(question, title="Delete model", yes="Delete", danger=True),
                             lambda yes: self._delete_answer(name, yes))

    def _delete_answer(self, name: str, yes: bool | None) -> None:
        if yes and self._begin(f"Deleting {name}…"):
            self.delete(name)

    @work(thread=True, exclusive=True, exit_on_error=False, group="models-task")
    def delete(self, name: str) -> None:
        self.backend.remove_model(name)
        self.app.call_from_thread(self.notify, f"Deleted {name!r}.")

    def action_refresh(self) -> None:
        self.load_models()

    def action_chat(self) -> None:
        if self.table.selected:
            self.hypr.open_chat(self.table.selected)

    def action_train(self) -> None:
        if self.table.selected:
            self.hypr.open_training(self.table.selected)
