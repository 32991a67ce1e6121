"""The Models screen's import dialog takes a .gguf file: the conversion runs in a child process
(the TUI's process never imports torch), its progress shows, the model appears; a file
transformers cannot read gives an error dialog and the app keeps running."""

from __future__ import annotations

import pytest

from hyprstream_tui.tui.app import HyprApp
from hyprstream_tui.tui.screens.models import ModelsScreen
from tests.gguf_files import write_other_arch_gguf, write_tiny_gguf
from tests.tui.helpers import wait_for
from tests.tui.test_errors import close_error, open_form, submit

pytestmark = pytest.mark.asyncio


async def test_import_dialog_takes_a_gguf_file(home, tmp_path):
    good = write_tiny_gguf(tmp_path / "tiny-q8.gguf", tensor_type="Q8_0")
    other = write_other_arch_gguf(tmp_path / "rwkv.gguf")
    app = HyprApp(home=home, warm_up=False)
    app.demo_offered = True
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, ModelsScreen)
        dialog = await open_form(pilot, "i")
        await submit(pilot, dialog, {"path": str(other)})
        message = await close_error(pilot)
        assert "rwkv6" in message and "llama" in message and "\n" not in message
        dialog = await open_form(pilot, "i")
        await submit(pilot, dialog, {"path": str(good), "name": "from-gguf"})
        await wait_for(pilot, lambda: screen.table.row_count == 1, what="the imported model", timeout=120)
        assert screen.table.selected == "from-gguf"
        assert app.errors == [message]
