"""The train form's "processes" field (training under torch.distributed): a bad value stays in the
form with the reason inline, worded by the field's label, and that field focused."""

from __future__ import annotations

import pytest

from hyprstream_tui.tui.app import HyprApp
from hyprstream_tui.tui.screens.training import TrainingScreen
from tests.tui.helpers import add_adapter, wait_for
from tests.tui.test_errors import open_form, submit

pytestmark = pytest.mark.asyncio


async def test_a_bad_processes_value_is_named_inline(demo_home):
    add_adapter(demo_home)
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        training = await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen.selected
                                  and app.screen)
        dialog = await open_form(pilot, "s")
        assert dialog.query_one("#field-processes").value == "1"
        for value, reason in (("two", "Processes must be a whole number"), ("0", "Processes must be between 1")):
            await submit(pilot, dialog, {"processes": value})
            await wait_for(pilot, lambda: reason in dialog.error_text, what=reason)
            assert app.screen is dialog and app.focused is not None and app.focused.id == "field-processes"
        await pilot.press("escape")
        assert training.jobs == {} and app.errors == []
