"""Sampling parameters and the system prompt. Each value is checked as it is typed (by the
engine's own SamplingParams rules) and a bad one is named inline, in one line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual import on
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Input, Label, Static

from hyprstream_tui.errors import InvalidInput
from hyprstream_tui.tui.widgets.text_input import TextInput

if TYPE_CHECKING:
    from hyprstream_tui.engine.params import SamplingParams

FIELDS = (
    ("temperature", "temperature", "0.7"),
    ("top_p", "top-p", "1.0"),
    ("top_k", "top-k (0 = off)", "0"),
    ("max_tokens", "max tokens", "256"),
    ("seed", "seed (blank = random)", ""),
)
INTS = {"top_k", "max_tokens", "seed"}


class ParamsPanel(VerticalScroll):
    error_text = ""  # the inline message naming the first bad value

    def compose(self) -> ComposeResult:
        yield Label("Parameters", classes="panel-title")
        for key, label, value in FIELDS:
            yield Label(label, classes="field-label")
            yield TextInput(value, id=f"param-{key}", classes="param", compact=True)
        yield Label("system prompt", classes="field-label")
        yield TextInput("", id="param-system", placeholder="(none)", compact=True)
        yield Static("", id="params-error", classes="form-error", markup=False)

    def raw(self) -> dict[str, str]:
        return {key: self.query_one(f"#param-{key}", Input).value.strip() for key, _l, _v in FIELDS}

    def set_values(self, **values: Any) -> None:
        for key, value in values.items():
            self.query_one(f"#param-{key}", Input).value = "" if value is None else str(value)

    @property
    def system(self) -> str:
        return self.query_one("#param-system", Input).value

    def sampling(self) -> SamplingParams:
        """The SamplingParams for these values, or InvalidInput naming the bad one."""
        from hyprstream_tui.engine.params import SamplingParams

        values: dict[str, Any] = {}
        for key, text in self.raw().items():
            if key == "seed" and not text:
                continue
            try:
                values[key] = int(text) if key in INTS else float(text)
            except ValueError:
                kind = "a whole number" if key in INTS else "a number"
                raise InvalidInput(f"{key} must be {kind}, got {text!r}.") from None
        return SamplingParams(**values)

    def check(self) -> str:
        """Validate and show the first problem inline; returns the message ('' when all is well)."""
        try:
            self.sampling()
            message = ""
        except InvalidInput as exc:
            message = exc.message
        self.error_text = message
        error = self.query_one("#params-error", Static)
        error.update(message)
        error.set_class(bool(message), "visible")
        for key, _l, _v in FIELDS:
            self.query_one(f"#param-{key}", Input).set_class(bool(message) and message.startswith(key), "-invalid")
        return message

    @on(Input.Changed, ".param")
    def _changed(self, _event: Input.Changed) -> None:
        self.check()
