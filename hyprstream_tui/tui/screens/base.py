"""What every mode's screen shares: the backend, the command palette entries built from the
screen's bindings, and forwarding of worker state changes to the app's one handler."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Iterable

from textual.app import SystemCommand
from textual.screen import Screen
from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from hyprstream_tui.tui.app import HyprApp
    from hyprstream_tui.tui.backend import Backend


class HyprScreen(Screen):
    # (title, help, action) for the command palette beyond what BINDINGS already shows.
    PALETTE: tuple[tuple[str, str, str], ...] = ()
    MODE_TITLE = ""
    MODE = ""  # the app mode this screen is the base of

    @property
    def hypr(self) -> "HyprApp":
        return self.app  # type: ignore[return-value]

    @property
    def backend(self) -> "Backend":
        return self.hypr.backend

    def on_mount(self) -> None:
        self.sub_title = self.MODE_TITLE
        self.app.mode_change_signal.subscribe(self, self._mode_changed)

    def _mode_changed(self, mode: str) -> None:
        if mode == self.MODE and self.is_mounted:
            self.on_mode_entered()

    def on_mode_entered(self) -> None:
        """The user switched to this screen's mode (not: a dialog over it closed): refresh here."""

    def palette_commands(self) -> Iterable[SystemCommand]:
        """Every binding of this screen with a description, plus PALETTE: actions are never key-only."""
        prefix = self.MODE_TITLE
        seen = set()
        for binding in self._bindings_for_palette():
            if binding.description and binding.action not in seen:
                seen.add(binding.action)
                key = binding.key_display or binding.key.split(",")[0]
                yield SystemCommand(f"{prefix}: {binding.description}", f"key {key}", partial(self.run_action, binding.action))
        for title, help_text, action in self.PALETTE:
            if action not in seen:
                yield SystemCommand(f"{prefix}: {title}", help_text, partial(self.run_action, action))

    def _bindings_for_palette(self):
        for binding in type(self).BINDINGS:
            if not isinstance(binding, tuple):
                yield binding

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.hypr.on_worker_state(event)
        if event.state in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            self.worker_finished(event.worker, event.state)

    def worker_finished(self, worker: Worker, state: WorkerState) -> None:
        """A worker of this screen ended (its errors are already shown); reset busy state here."""
