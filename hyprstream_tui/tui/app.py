"""The hyprstream workstation: four modes (Models, Chat, Training, History) switched by F-keys,
every action also in the command palette (ctrl+p), and one place that turns worker failures into
an error dialog. Torch and pygit2 load in a background worker after the first frame is painted."""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from pathlib import Path
from typing import Callable, ClassVar, Iterable

from textual import events
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from hyprstream_tui.errors import Cancelled, HyprError
from hyprstream_tui.tui.backend import Backend
from hyprstream_tui.tui.batch import IDLE_S, TYPING_S
from hyprstream_tui.tui.format import setting_label
from hyprstream_tui.tui.messages import Target, TargetChanged
from hyprstream_tui.tui.priority import Collections, SwitchInterval
from hyprstream_tui.tui.screens.dialogs import ConfirmDialog, ErrorDialog
from hyprstream_tui.tui.screens.models import ModelsScreen

log = logging.getLogger(__name__)

# The first frame shows Models; the other screens (Markdown, plotext) load when first opened, or
# in the background warm-up just after the first paint.
LAZY_SCREENS = {"chat": ("hyprstream_tui.tui.screens.chat", "ChatScreen"),
                "training": ("hyprstream_tui.tui.screens.training", "TrainingScreen"),
                "history": ("hyprstream_tui.tui.screens.history", "HistoryScreen")}


def _lazy(mode: str) -> Callable[[], Screen]:
    def make() -> Screen:
        module, name = LAZY_SCREENS[mode]
        return getattr(importlib.import_module(module), name)()

    return make


def preload_screens() -> None:
    for module, _name in LAZY_SCREENS.values():
        importlib.import_module(module)


WARM_UP_DELAY_S = 0.3

MODE_KEYS = (("models", "f1", "Models"), ("chat", "f2", "Chat"), ("training", "f3", "Train"),
             ("history", "f4", "History"))


class HyprApp(App[int]):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses live in other folders
    TITLE = "hyprstream"
    MODES = {"models": ModelsScreen, **{mode: _lazy(mode) for mode in LAZY_SCREENS}}
    DEFAULT_MODE = "models"
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(key, f"switch_mode('{mode}')", title, priority=True) for mode, key, title in MODE_KEYS),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
    ]

    def __init__(self, *, home: str | Path | None = None, remote: str | None = None,
                 backend: Backend | None = None, warm_up: bool = True) -> None:
        super().__init__()
        self.backend = backend or Backend(home=home, remote=remote)
        self.demo_offered = False
        self.painted = False  # the first frame is on the terminal (events.Ready)
        self.pending: dict[str, Target] = {}  # mode -> what it should show when it resumes
        self.errors: list[str] = []  # every error shown, newest last (tests and the log read it)
        self._warm_up = warm_up
        self._switch_interval = SwitchInterval()
        self.collections = Collections()
        self.last_key = float("-inf")  # time.monotonic() of the last key press
        self._key_handled = False  # a key's handler has run; its frame is the next one displayed

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key):
            self.last_key = time.monotonic()
            await super().on_event(event)  # hands the key to the focused widget's queue
            (self.focused or self.screen).call_later(self._mark_key_handled)  # runs after that key
            return
        await super().on_event(event)

    def _mark_key_handled(self) -> None:
        self._key_handled = True

    def post_display_hook(self) -> None:
        """A frame is on the terminal. The first one after a key's handler ran shows that key:
        now the next key is as far away as it will be, so the work that a key must not wait for
        runs now (`_after_key`). (`call_after_refresh` is too early for this: it can run before
        the key's frame, when the screen has not yet heard that the input needs one.)"""
        if self._key_handled:
            self._key_handled = False
            self.call_later(self._after_key)

    def _after_key(self) -> None:
        """One piece of held-back work per key: a full collection when one is due, else the
        screen's (a chat redraws a streaming reply)."""
        if self.collections.due():
            self.collections.collect()
        else:
            after_key = getattr(self.screen, "after_key", None)
            if after_key is not None:
                after_key()

    def _collect_when_idle(self) -> None:
        if not self.typing(IDLE_S):
            self.collections.collect()

    def typing(self, within: float = TYPING_S) -> bool:
        """A key came within the last `within` seconds: redraws that can wait, wait."""
        return time.monotonic() - self.last_key < within

    def on_mount(self) -> None:
        self._switch_interval.__enter__()
        self.collections.__enter__()
        self.set_interval(IDLE_S, self._collect_when_idle)

    def on_ready(self) -> None:
        """The first frame is on the terminal: now load what it did not need (imports hold the GIL,
        so they must not race the first paint)."""
        self.painted = True
        for stack in self._screen_stacks.values():
            if stack and hasattr(stack[0], "first_frame"):
                stack[0].first_frame()
        if self._warm_up:
            self.set_timer(WARM_UP_DELAY_S, lambda: self.run_worker(self._warm_up_work, thread=True, exclusive=True,
                                                                    exit_on_error=False, group="warm-up"))

    def _warm_up_work(self) -> None:
        from hyprstream_tui.tui.priority import run_in_background

        preload_screens()
        run_in_background(self.backend.warm_up)

    def on_unmount(self) -> None:
        self._switch_interval.__exit__()
        self.collections.__exit__()
        self.backend.close()

    async def action_quit(self) -> None:
        """Quit; a running training run is asked about first, then stops after its step and commits."""
        training = [job for job in self.backend.running_jobs() if job.startswith("training")]
        if not training:
            self.exit()
            return
        question = (f"{training[0][0].upper() + training[0][1:]} is running. Quit anyway? It stops after the current "
                    "step and commits a checkpoint, so a later start resumes there.")

        def answer(yes: bool | None) -> None:
            if yes:
                self.backend.stop_all()
                self.exit()

        self.push_screen(ConfirmDialog(question, title="Quit", yes="Quit"), answer)

    # ---- navigation ----------------------------------------------------------------------------
    def open_chat(self, model: str, adapter: str | None = None, commit: str | None = None, *,
                  compare: str | None = None) -> None:
        self._open("chat", Target(model, adapter, commit, compare))

    def open_training(self, model: str, adapter: str | None = None) -> None:
        self._open("training", Target(model, adapter))

    def open_history(self, model: str, adapter: str | None = None) -> None:
        self._open("history", Target(model, adapter))

    def _open(self, mode: str, target: Target) -> None:
        self.pending[mode] = target
        if self.current_mode == mode:
            self.screen.post_message(TargetChanged())
        else:
            self.switch_mode(mode)

    def take_target(self, mode: str) -> Target | None:
        return self.pending.pop(mode, None)

    # ---- command palette -----------------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for mode, key, title in MODE_KEYS:
            yield SystemCommand(f"Go to {title}", f"switch to the {title} screen ({key})",
                                lambda mode=mode: self.switch_mode(mode))
        base = self._base_screen(screen)
        if base is not None and hasattr(base, "palette_commands"):
            yield from base.palette_commands()

    def _base_screen(self, screen: Screen) -> Screen | None:
        try:
            return self.screen_stack[0] if not hasattr(screen, "palette_commands") else screen
        except IndexError:
            return None

    # ---- the one failure handler ---------------------------------------------------------------
    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.on_worker_state(event)

    def on_worker_state(self, event: Worker.StateChanged) -> None:
        error = event.worker.error
        if event.state != WorkerState.ERROR or error is None:
            return
        if isinstance(error, Cancelled):
            self.notify(error.message, title="Stopped")
            return
        if isinstance(error, HyprError):
            self.show_error(error.worded(setting_label))  # a setting by its label, never a CLI flag
            return
        log.error("worker %s failed:\n%s", event.worker.name,
                  "".join(traceback.format_exception(error)))
        self.show_error(f"Unexpected {type(error).__name__}: {error}. This is a bug; the app keeps running.",
                        title="Internal error")

    def show_error(self, message: str, *, title: str = "Error") -> None:
        self.errors.append(message)
        self.push_screen(ErrorDialog(message, title=title))


def run_app(*, home: str | Path | None = None, remote: str | None = None) -> int:
    app = HyprApp(home=home, remote=remote)
    app.run()
    _wait_for_training()
    return int(app.return_code or 0)


def _wait_for_training() -> None:
    """Training runs in child processes, asked to stop when the app closes: say why the terminal
    waits while they finish their step and commit."""
    import multiprocessing
    import sys

    children = [c for c in multiprocessing.active_children() if not c.daemon]  # the engine is daemon
    if not children:
        return
    print("hyprstream: training stops after its current step and commits a checkpoint...",
          file=sys.stderr, flush=True)
    for child in children:
        child.join()
