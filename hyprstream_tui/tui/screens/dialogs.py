"""Modal dialogs: an error, a yes/no confirmation, and a small form that checks its own values.

A form's `check` runs when the user submits: it turns the raw strings into a value (or raises a
HyprError, shown inline under the fields, and the dialog stays open). Only cheap checks belong
there: anything that touches disk runs in a worker after the dialog closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from hyprstream_tui.errors import HyprError
from hyprstream_tui.tui.format import setting_label
from hyprstream_tui.tui.widgets.text_input import TextInput

def when_given(action: Callable[[Any], object]) -> Callable[[Any], None]:
    """A dialog's callback that runs `action` with the answer, unless the dialog was cancelled
    (dismissed with None) or answered no (False)."""

    def answered(value: Any) -> None:
        if value:
            action(value)

    return answered


class ErrorDialog(ModalScreen[None]):
    """A failure the user can act on: one line that says what to do."""

    BINDINGS = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, message: str, *, title: str = "Error") -> None:
        super().__init__(classes="dialog error-dialog")
        self.message = message
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(self.message, id="error-message", classes="dialog-body", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="error", id="ok")

    def on_mount(self) -> None:
        self.query_one("#ok", Button).focus()

    @on(Button.Pressed, "#ok")
    def _close(self) -> None:
        self.dismiss(None)


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "answer(False)", "No"), Binding("y", "answer(True)", "Yes")]

    def __init__(self, question: str, *, title: str = "Confirm", yes: str = "Yes", danger: bool = False) -> None:
        super().__init__(classes="dialog")
        self.question, self.title_text, self.yes, self.danger = question, title, yes, danger

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(self.question, classes="dialog-body", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error" if self.danger else "primary", id="yes")
                yield Button("Cancel", id="no")

    def on_mount(self) -> None:
        self.query_one("#no" if self.danger else "#yes", Button).focus()

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    value: str = ""
    placeholder: str = ""
    multiline: bool = False


class FormDialog(ModalScreen[Any]):
    """Fields, a submit button, and an inline error line; dismisses with `check(values)`.

    An error about a setting names it by its field's label (never a CLI flag) and focuses it."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "submit", "Submit", show=False)]

    def __init__(self, title: str, fields: list[Field], *, submit: str = "OK",
                 check: Callable[[dict[str, str]], Any] | None = None, note: str = "") -> None:
        super().__init__(classes="dialog")
        self.title_text, self.fields, self.submit_label, self.note = title, fields, submit, note
        self.check = check or (lambda values: values)
        self.error_text = ""  # the inline message under the fields

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box form-box"):
            yield Label(self.title_text, classes="dialog-title")
            if self.note:
                yield Static(self.note, classes="dialog-note", markup=False)
            with VerticalScroll(classes="form-fields"):
                for f in self.fields:
                    yield Label(f.label, classes="field-label")
                    if f.multiline:
                        yield TextArea(f.value, id=f"field-{f.name}", classes="field-area", show_line_numbers=False)
                    else:
                        yield TextInput(f.value, placeholder=f.placeholder, id=f"field-{f.name}")
            yield Static("", id="form-error", classes="form-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.submit_label, variant="primary", id="submit")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        if self.fields:
            self.query_one(f"#field-{self.fields[0].name}").focus()

    def values(self) -> dict[str, str]:
        out = {}
        for f in self.fields:
            if f.multiline:
                out[f.name] = self.query_one(f"#field-{f.name}", TextArea).text
            else:
                out[f.name] = self.query_one(f"#field-{f.name}", Input).value
        return out

    def show_error(self, message: str) -> None:
        self.error_text = message
        error = self.query_one("#form-error", Static)
        error.update(message)
        error.set_class(bool(message), "visible")

    def action_submit(self) -> None:
        try:
            result = self.check(self.values())
        except HyprError as exc:
            self.show_error(exc.worded(self.label_of))
            if any(f.name == exc.setting for f in self.fields):
                self.query_one(f"#field-{exc.setting}").focus()  # the field to change
            return
        self.dismiss(result)

    def label_of(self, setting: str) -> str:
        """A setting an error names, as this form calls it: its field's label where it has one."""
        return next((f.label for f in self.fields if f.name == setting), setting_label(setting))

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "submit":
            self.action_submit()
        else:
            self.dismiss(None)


class PickDialog(ModalScreen[Any]):
    """A list to choose one entry from; dismisses with its value (None on escape)."""

    BINDINGS = [Binding("escape", "dismiss", "Close")]

    def __init__(self, title: str, options: list[tuple[str, Any]], *, note: str = "") -> None:
        super().__init__(classes="dialog")
        self.title_text, self.options, self.note = title, options, note

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box text-box"):
            yield Label(self.title_text, classes="dialog-title")
            yield OptionList(*[Option(label, id=str(i)) for i, (label, _v) in enumerate(self.options)],
                             id="pick-list")
            if self.note:
                yield Static(self.note, classes="dialog-note", markup=False)

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.options[event.option_index][1])


class TextDialog(ModalScreen[None]):
    """Read-only text (provenance, samples, exported paths)."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "Close")]

    def __init__(self, title: str, text: str) -> None:
        super().__init__(classes="dialog")
        self.title_text, self.text = title, text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box text-box"):
            yield Label(self.title_text, classes="dialog-title")
            with VerticalScroll(classes="text-body"):
                yield Static(self.text, markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Close", id="close")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    @on(Button.Pressed)
    def _close(self) -> None:
        self.dismiss(None)
