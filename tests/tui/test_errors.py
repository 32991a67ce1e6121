"""What goes wrong shows a dialog or an inline message, and the app keeps running."""

from __future__ import annotations

import pytest

from hyprstream_tui.tui.app import HyprApp
from hyprstream_tui.tui.screens.chat import ChatScreen
from hyprstream_tui.tui.screens.dialogs import ErrorDialog, FormDialog
from hyprstream_tui.tui.screens.models import ModelsScreen
from hyprstream_tui.tui.screens.training import TrainingScreen
from tests.tui.helpers import add_adapter
from tests.tui.helpers import screen_text, wait_for

pytestmark = pytest.mark.asyncio


async def open_form(pilot, key: str) -> FormDialog:
    await pilot.press(key)
    return await wait_for(pilot, lambda: isinstance(pilot.app.screen, FormDialog) and pilot.app.screen,
                          what="a form dialog")


async def submit(pilot, dialog: FormDialog, values: dict[str, str]) -> None:
    for name, value in values.items():
        dialog.query_one(f"#field-{name}").value = value
    await pilot.press("ctrl+s")
    await pilot.pause()


async def close_error(pilot) -> str:
    dialog = await wait_for(pilot, lambda: isinstance(pilot.app.screen, ErrorDialog) and pilot.app.screen,
                            what="an error dialog")
    message = dialog.message
    await pilot.press("enter")
    await wait_for(pilot, lambda: not isinstance(pilot.app.screen, ErrorDialog), what="the dialog to close")
    return message


async def test_pull_of_an_unknown_repo_shows_a_dialog(home, hub_server, tiny_model_src):
    hub_server.add_repo("org/tiny", tiny_model_src)
    app = HyprApp(home=home, warm_up=False)
    app.demo_offered = True
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, ModelsScreen)
        # A malformed id never leaves the form.
        dialog = await open_form(pilot, "p")
        await submit(pilot, dialog, {"repo": "not a repo id"})
        assert app.screen is dialog and "ORG/NAME" in dialog.error_text
        # An unknown repository: the hub says 404, the app says so in a dialog.
        await submit(pilot, dialog, {"repo": "org/does-not-exist"})
        message = await close_error(pilot)
        assert "org/does-not-exist" in message and "\n" not in message
        # ... and keeps running: a real pull from the same hub works, with its progress strip.
        dialog = await open_form(pilot, "p")
        await submit(pilot, dialog, {"repo": "org/tiny"})
        await wait_for(pilot, lambda: screen.table.row_count == 1, what="the pulled model", timeout=60)
        assert screen.table.selected == "tiny" and app.errors == [message]


async def test_training_an_adapter_already_training_shows_a_dialog(demo_home):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from hyprstream_tui.store.locks import FileLock

    info = add_adapter(demo_home)
    store = Store(Paths.from_env(demo_home))
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen.selected
                                and app.screen)
        # Another process (the CLI) trains this adapter: it holds the adapter's train lock.
        lock = FileLock(store.train_lock_path("tiny-demo", info.uuid), "test").acquire()
        try:
            dialog = await open_form(pilot, "s")
            await submit(pilot, dialog, {"steps": "5"})
            message = await close_error(pilot)
        finally:
            lock.release()
        assert "training already" in message and "quiz" in message
        assert screen.jobs == {}
        # Started twice from the app itself: the second start is refused, the first runs on.
        dialog = await open_form(pilot, "s")
        await submit(pilot, dialog, {"steps": "400", "checkpoint_every": "400"})
        await wait_for(pilot, lambda: screen.jobs, what="the first job")
        dialog = await open_form(pilot, "s")
        await submit(pilot, dialog, {"steps": "5"})
        message = await close_error(pilot)
        assert "training already" in message
        job = next(iter(screen.jobs.values()))
        await wait_for(pilot, lambda: job.step, what="steps of the first job", timeout=120)
        await pilot.press("x")
        await wait_for(pilot, lambda: not screen.jobs, what="the stop", timeout=60)
        assert job.state == "stopped" and job.step < 400
        assert len(app.errors) == 2 and all("training already" in e for e in app.errors)


async def test_bad_parameter_values_are_named_inline(demo_home):
    add_adapter(demo_home)
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f2")
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model and app.screen)
        chat.params.set_values(temperature="-1")
        await pilot.pause()
        error = chat.params.query_one("#params-error")
        assert "temperature must be >= 0" in chat.params.error_text and error.has_class("visible")
        chat.params.set_values(temperature="0.5", top_p="lots")
        await pilot.pause()
        assert "top_p must be a number" in chat.params.error_text
        chat.query_one("#chat-input").value = "hello"
        chat.query_one("#chat-input").focus()
        await pilot.press("enter")
        await pilot.pause()
        assert chat.log_view.last_user() is None, "a prompt was sent with bad parameters"
        assert chat.query_one("#chat-input").value == "hello"
        chat.params.set_values(top_p="0.9")
        await pilot.pause()
        assert not error.has_class("visible")

        # The training form keeps bad values in the dialog, with the reason under the fields.
        await pilot.press("f3")
        training = await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen.selected
                                  and app.screen)
        dialog = await open_form(pilot, "s")
        for values, reason in (({"learning_rate": "fast"}, "Learning rate must be a number"),
                               ({"learning_rate": "5"}, "far too large"),
                               ({"learning_rate": "1e-3", "batch_size": "0"}, "Batch size must be at least 1")):
            await submit(pilot, dialog, values)
            await wait_for(pilot, lambda: reason in dialog.error_text, what=reason)
            assert app.screen is dialog
        await pilot.press("escape")
        assert training.jobs == {} and app.errors == []


async def test_an_error_about_a_setting_names_its_field_never_a_cli_flag(demo_home):
    """The engine names a setting (`batch_size`); the TUI says it as its form does: inline under
    the form (with the field focused), and in the error dialog of a worker that failed."""
    add_adapter(demo_home)
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen.selected)
        # Checked by TrainConfig while the form is open.
        dialog = await open_form(pilot, "s")
        await submit(pilot, dialog, {"batch_size": "0", "checkpoint_every": "5"})
        await wait_for(pilot, lambda: dialog.error_text, what="the inline error")
        assert dialog.error_text == "Batch size must be at least 1, got 0."
        assert app.focused is not None and app.focused.id == "field-batch_size"
        await pilot.press("escape")
        # Refused by the store in a worker, after the form closed: a name taken already.
        dialog = await open_form(pilot, "n")
        await submit(pilot, dialog, {"name": "quiz"})
        message = await close_error(pilot)
        assert message.endswith("has an adapter named 'quiz' already: choose another Name."), message
        assert "--" not in message and "`" not in message


async def test_rollback_while_training_and_a_bug_in_a_worker_show_dialogs(demo_home):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from hyprstream_tui.store.locks import FileLock
    from hyprstream_tui.tui.screens.history import HistoryScreen

    info = add_adapter(demo_home)
    store = Store(Paths.from_env(demo_home))
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f4")
        history = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen) and app.screen.graph.row_count
                                 and app.screen)
        lock = FileLock(store.train_lock_path("tiny-demo", info.uuid), "test").acquire()
        try:
            await pilot.press("b")
            await pilot.press("y")
            message = await close_error(pilot)
        finally:
            lock.release()
        assert "is training" in message

        def broken(*_args, **_kwargs):
            raise ZeroDivisionError("boom")

        app.backend.log = broken
        await pilot.press("r")
        message = await close_error(pilot)
        assert message.startswith("Unexpected ZeroDivisionError: boom") and "bug" in message
        assert isinstance(app.screen, HistoryScreen) and app.is_running


async def test_quitting_while_training_asks_then_commits_the_step(demo_home):
    import time

    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from hyprstream_tui.store.locks import is_locked
    from hyprstream_tui.tui.screens.dialogs import ConfirmDialog

    info = add_adapter(demo_home)
    store = Store(Paths.from_env(demo_home))
    app = HyprApp(home=demo_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen.selected
                                and app.screen)
        dialog = await open_form(pilot, "s")
        await submit(pilot, dialog, {"steps": "5000", "checkpoint_every": "5000"})
        job = await wait_for(pilot, lambda: next(iter(screen.jobs.values()), None), what="the job")
        await wait_for(pilot, lambda: job.step, what="a step", timeout=120)
        await pilot.press("ctrl+q")
        confirm = await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog) and app.screen)
        assert "training of quiz on tiny-demo is running" in confirm.question.lower()
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit", timeout=10)
    deadline = time.monotonic() + 60
    while is_locked(store.train_lock_path("tiny-demo", info.uuid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    last = store.log("tiny-demo", "quiz")[0]
    assert last.kind == "checkpoint" and 0 < last.step < 5000


async def test_training_and_chat_started_together_on_a_bf16_model(home, tmp_path):
    """transformers sets torch's global default dtype while it builds a model: a chat and a training
    run that load at the same moment must not leave each other's tensors in the wrong dtype."""
    from hyprstream_tui.engine.tiny import build_tiny_model
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    store.import_model(build_tiny_model(tmp_path / "bf16", dtype="bfloat16"), name="tiny-bf16")
    store.create_adapter("tiny-bf16", "quiz")
    add_samples(store, "tiny-bf16", "quiz", [{"input": f"q{i}", "output": f"a{i}"} for i in range(4)])
    app = HyprApp(home=home)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        training = await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen.selected
                                  and app.screen)
        dialog = await open_form(pilot, "s")
        await submit(pilot, dialog, {"steps": "10", "checkpoint_every": "10"})
        await pilot.press("f2")
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model and app.screen)
        chat.params.set_values(temperature=0, max_tokens=16)
        chat.query_one("#chat-input").value = "Hello"
        chat.query_one("#chat-input").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.generations == 1 and not chat.log_view.pending and chat.request is None,
                       what="the reply", timeout=120)
        await wait_for(pilot, lambda: not training.jobs, what="training", timeout=180)
        assert app.errors == []
        assert chat.log_view.last_reply().meta["finish_reason"] in ("eos", "length")
    assert store.log("tiny-bf16", "quiz")[0].step == 10
