"""TextInput: typing redraws the input alone (no layout of the whole screen), and it scrolls and
draws exactly as Textual's Input does. Pilot drives a small app with both side by side."""

from __future__ import annotations

import pytest
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Input, Static

from hyprstream_tui.tui.widgets.text_input import TextInput
from tests.tui.helpers import count_layouts

pytestmark = pytest.mark.asyncio


class InputsApp(App):
    CSS = "Input { width: 24; }"

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            for i in range(40):
                yield Static(f"line {i} " * 10)
        yield TextInput(id="ours")
        yield Input(id="textual")


async def test_typing_in_a_text_input_does_not_lay_out_the_screen():
    app = InputsApp()
    async with app.run_test(size=(60, 20)) as pilot:
        ours, textual = app.query_one("#ours", TextInput), app.query_one("#textual", Input)
        for widget in (textual, ours):
            widget.focus()
            await pilot.pause()
            layouts = count_layouts(app.screen)
            await pilot.press(*"hello")
            await pilot.pause()
            widget.layouts = layouts[0]
        assert ours.value == textual.value == "hello"
        assert textual.layouts >= 5  # Textual's Input: one per key (what this widget avoids)
        assert ours.layouts == 0


async def test_a_text_input_scrolls_and_draws_like_textuals_input():
    app = InputsApp()
    groups = [[*("abcdefghij" * 3)], ["home"], ["right", "right"], ["end"], ["left", *"xyz"], ["backspace"],
              ["home", "delete"], ["end"]]
    async with app.run_test(size=(60, 20)) as pilot:
        ours, textual = app.query_one("#ours", TextInput), app.query_one("#textual", Input)
        states = []
        for widget in (ours, textual):
            widget.focus()
            await pilot.pause()
            seen = []
            for keys in groups:
                await pilot.press(*keys)
                await pilot.pause()
                seen.append((widget.value, widget.cursor_position, widget.scroll_x, widget.max_scroll_x,
                             widget.render_line(0).text))
            states.append(seen)
        assert states[0] == states[1]
        assert max(scroll for _v, _c, scroll, _m, _t in states[0]) > 0  # the text outgrew the input
