"""benchmarks/coldstart.py's TUI case, one whole app process: switching the chat to another model.

    python benchmarks/coldstart_tui.py HOME QUESTION MAX_TOKENS warm|at-once MODEL [MODEL ...]

The real app runs headless under Textual's Pilot, on a home that holds the demo model and the
MODELs (not loaded yet). `warm`: once the app's warm-up has run (the forkserver has imported torch
and the engine process is forked from it); `at-once`: as soon as the app is up. Then the chat opens
on the demo model, and, as a user does, the model picker is set to the first MODEL and QUESTION is
sent (greedy, MAX_TOKENS); then the same with the next MODEL. Each switch is timed from the
picker's change to the reply's first text handed to the chat screen (the first text event the
screen's callback gets; it is drawn on the next flush), and to the reply's end. (Timing the drawn
text instead, by polling the chat message, missed a reply that ended before `Pilot.press`
returned: a reply from the step image while the engine's process starts takes well under a second.) Prints one JSON line: {"ready": app start to
warm-up done (null with at-once), "switches": [[first s, end s, reply], ...], "pids": [[pid,
create_time], ...] of the app's child processes, for the caller to see them end}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def until(app, condition: Callable[[], object], what: str, timeout: float = 600.0) -> None:
    """Let the app run (5 ms steps) until `condition()` holds; an error the app shows ends the run."""
    deadline = time.perf_counter() + timeout
    while not condition():
        if app.errors or time.perf_counter() > deadline:
            raise SystemExit(f"waiting for {what}: {app.errors or 'timed out'}")
        await asyncio.sleep(0.005)


async def switch(app, pilot, chat, model: str, question: str) -> list:
    """Pick `model`, send `question` once the chat has taken the pick: [to first text, to end, reply]."""
    from textual.widgets import Select

    marks: dict[str, object] = {}
    backend_chat = app.backend.chat

    def timed_chat(specs, messages, params, *, request_ids, on_event, cancel):  # type: ignore[no-untyped-def]
        def on(event: object) -> None:
            if "first" not in marks and getattr(event, "text", ""):
                marks["first"] = time.perf_counter()
            on_event(event)

        results = backend_chat(specs, messages, params, request_ids=request_ids, on_event=on, cancel=cancel)
        marks["text"] = results[0].text
        return results

    app.backend.chat = timed_chat  # type: ignore[method-assign]
    started = time.perf_counter()
    chat.query_one("#chat-model", Select).value = model
    await until(app, lambda: chat.model == model, f"the chat to take {model}")
    box = chat.query_one("#chat-input")
    box.value = question
    box.focus()
    before = chat.generations
    await pilot.press("enter")
    await until(app, lambda: chat.generations > before and "text" in marks and chat.request is None,
                "the reply's end")
    ended = time.perf_counter()
    app.backend.chat = backend_chat  # type: ignore[method-assign]
    return [float(marks.get("first", ended)) - started, ended - started, marks["text"]]


async def drive(home: str, question: str, max_tokens: int, warm: bool, models: list[str]) -> dict:
    import psutil

    from hyprstream_tui.engine.tiny import DEMO_NAME
    from hyprstream_tui.tui.app import HyprApp
    from hyprstream_tui.tui.screens.chat import ChatScreen

    app = HyprApp(home=home)
    warmed = threading.Event()
    warm_up = app.backend.warm_up
    app.backend.warm_up = lambda: (warm_up(), warmed.set())  # type: ignore[method-assign]
    async with app.run_test(size=(100, 30)) as pilot:
        ready = None
        if warm:
            await until(app, warmed.is_set, "the warm-up")
            ready = time.time() - psutil.Process().create_time()
        app.open_chat(DEMO_NAME)
        await until(app, lambda: isinstance(app.screen, ChatScreen) and app.screen.model == DEMO_NAME, "the chat")
        chat = app.screen
        await until(app, lambda: chat.query_one("#chat-model").value == DEMO_NAME, "the picker")
        chat.params.set_values(temperature=0, max_tokens=max_tokens)
        if warm:
            await asyncio.sleep(0.5)  # the user reads the screen: nothing left running
        switches = [await switch(app, pilot, chat, model, question) for model in models]
        pids = [[p.pid, p.create_time()] for p in psutil.Process().children(recursive=True)]
    return {"ready": ready, "switches": switches, "pids": pids}


if __name__ == "__main__":
    home, question, max_tokens, when, *models = sys.argv[1:]
    print(json.dumps(asyncio.run(drive(home, question, int(max_tokens), when == "warm", models))))
