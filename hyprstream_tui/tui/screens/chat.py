"""Chat: streaming replies rendered as Markdown, stop, regenerate, edit and resend; a model and
adapter (or commit) picker; the parameters panel; a context meter; compare mode (the same prompt
answered by two targets side by side); saved conversations; provenance on demand; and one key to
send a reply to an adapter's training set."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Input, Label, Select
from textual.worker import Worker, WorkerState

from hyprstream_tui.errors import InvalidInput
from hyprstream_tui.tui.batch import TYPING_HZ, UI_HZ
from hyprstream_tui.tui.messages import TargetChanged
from hyprstream_tui.tui.targets import ChatTargets, label_of, spec_of
from hyprstream_tui.tui.screens.chat_conversations import ConversationActions
from hyprstream_tui.tui.screens.dialogs import Field, FormDialog, PickDialog, when_given
from hyprstream_tui.tui.widgets.chat_log import ChatLog
from hyprstream_tui.tui.widgets.context_meter import ContextMeter
from hyprstream_tui.tui.widgets.params_panel import ParamsPanel
from hyprstream_tui.tui.widgets.text_input import TextInput

if TYPE_CHECKING:
    from hyprstream_tui.engine.params import SamplingParams

BASE = "__base__"


@dataclass
class Request:
    """One send: the conversation so far and the targets that answer it."""

    messages: list[dict[str, str]]
    specs: list[str]
    request_ids: list[str]
    params: SamplingParams
    conversation_id: int | None
    title: str
    user_text: str | None  # saved before generating (None when regenerating)
    cancel: threading.Event = field(default_factory=threading.Event)


class ChatScreen(ConversationActions):
    MODE_TITLE = "Chat"
    MODE = "chat"
    AUTO_FOCUS = "#chat-input"
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+z", "edit_last", "Edit the last prompt and resend", show=False),
        Binding("ctrl+o", "toggle_params", "Params"),
        Binding("ctrl+b", "toggle_compare", "Compare"),
        Binding("ctrl+y", "toggle_provenance", "Provenance", show=False),
        Binding("ctrl+t", "to_training", "To training", show=False),
        Binding("ctrl+l", "conversations", "Conversations", show=False),
        Binding("ctrl+n", "new_conversation", "New chat", show=False),
        Binding("ctrl+g", "pick_commit", "Chat with a commit of the adapter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.model: str | None = None
        self.adapter: str | None = None  # adapter name
        self.rev: str | None = None  # a commit pinned from History
        self.compare = False
        self.compare_spec: str | None = None  # the second target; default: base vs adapter
        self.conversation_id: int | None = None
        self.request: Request | None = None
        self.window = 0
        self._shown = 0.0  # time.monotonic() when streamed text was last drawn
        self.untrained: frozenset[str] = frozenset()  # adapters without a checkpoint: nothing to load yet
        self.generations = 0  # requests started (tests wait on it)

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-pickers", classes="pickers"):
            yield Select([], prompt="model", id="chat-model", compact=True)
            yield Select([], prompt="adapter", id="chat-adapter", compact=True)
            yield Label("", id="chat-target")
        with Horizontal(id="chat-body"):
            with Vertical(id="chat-main"):
                yield ChatLog(id="chat-log")
                yield ContextMeter(id="chat-meter")
                yield TextInput(placeholder="Message (enter sends, esc stops)", id="chat-input")
            yield ParamsPanel(id="chat-params")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(1 / UI_HZ, self._drain)
        self._retarget()

    def on_mode_entered(self) -> None:
        self._retarget()

    def on_target_changed(self, _event: TargetChanged) -> None:
        self._retarget()

    def _retarget(self) -> None:
        target = self.hypr.take_target("chat")
        if target is not None:
            self.model, self.adapter, self.rev = target.model, target.adapter, target.commit
            if target.compare:
                self.compare, self.compare_spec = True, target.compare
        self.load_targets(self.model, self.adapter)

    @property
    def params(self) -> ParamsPanel:
        return self.query_one(ParamsPanel)

    @property
    def spec(self) -> str | None:
        return spec_of(self.model, self.adapter, self.rev) if self.model else None

    def second_spec(self) -> str | None:
        if self.compare_spec:
            return self.compare_spec
        if self.model is None:
            return None
        return spec_of(self.model, None, None) if self.adapter else None

    # ---- targets -------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="chat-targets")
    def load_targets(self, model: str | None, adapter: str | None) -> None:
        targets = self.backend.chat_targets(model)
        self.app.call_from_thread(self._show_targets, targets, adapter if adapter in targets.adapters else None)

    def _show_targets(self, targets: ChatTargets, adapter: str | None) -> None:
        model = targets.model
        self.untrained = targets.untrained
        if adapter != self.adapter or model != self.model:
            self.rev = None
        self.model, self.adapter, self.window = model, adapter, targets.window
        with self.prevent(Select.Changed):
            picker = self.query_one("#chat-model", Select)
            picker.set_options([(m, m) for m in targets.models])
            if model:
                picker.value = model
            adapter_picker = self.query_one("#chat-adapter", Select)
            adapter_picker.set_options([("(base model)", BASE)] +
                                       [(a + (" (untrained)" if a in self.untrained else ""), a) for a in targets.adapters])
            adapter_picker.value = adapter or BASE
        self.query_one(ContextMeter).set_usage(window=targets.window)
        self._show_target_label()

    def _show_target_label(self) -> None:
        text = f"@{self.rev[:7]}" if self.rev else ""
        if self.compare:
            other = self.second_spec()
            text += f"  compare with {label_of(other)}" if other else "  compare: pick an adapter"
        self.query_one("#chat-target", Label).update(text)

    @on(Select.Changed, "#chat-model")
    def _model_changed(self, event: Select.Changed) -> None:
        if event.value != Select.NULL and event.value != self.model:
            self.compare_spec = None
            self.load_targets(str(event.value), None)

    @on(Select.Changed, "#chat-adapter")
    def _adapter_changed(self, event: Select.Changed) -> None:
        value = None if event.value in (BASE, Select.NULL) else str(event.value)
        if value != self.adapter:
            self.adapter, self.rev = value, None
            self._show_target_label()

    # ---- sending -------------------------------------------------------------------------------
    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value
        if not text.strip():
            return
        if self.send(text):
            event.input.value = ""

    def send(self, text: str) -> bool:
        if self.log_view.streaming:
            self.notify("A reply is still streaming: press esc to stop it first.", severity="warning")
            return False
        request = self._request(text)
        if request is None:
            return False
        user = self.log_view.add_user(text)
        self._start(request, user)
        return True

    def _request(self, user_text: str | None, context: list | None = None) -> Request | None:
        """The request for `user_text` after the conversation on screen (or `context`, when the
        widgets after it are on their way out)."""
        spec = self.spec
        if spec is None:
            self.notify("No model: build the demo model or import one on the Models screen (F1).", severity="warning")
            return None
        if self.adapter in self.untrained and not self.rev:
            self.notify(f"Adapter {self.adapter!r} has no trained weights yet: add samples and train it (F3), "
                        "or pick the base model.", severity="error")
            return None
        problem = self.params.check()
        if problem:
            self.notify(problem, title="Parameters", severity="error")
            return None
        specs = [spec]
        if self.compare:
            other = self.second_spec()
            if other is None:
                self.notify("Compare mode needs an adapter (or a second commit) to compare with.", severity="warning")
                return None
            specs.append(other)
        context = self.log_view.messages() if context is None else context
        messages = [{"role": m.role, "content": m.text} for m in context if m.text or m.role == "user"]
        if user_text is not None:
            messages.append({"role": "user", "content": user_text})
        if self.params.system.strip():
            messages.insert(0, {"role": "system", "content": self.params.system})
        title = next((m["content"] for m in messages if m["role"] == "user"), "chat")
        return Request(messages=messages, specs=specs, request_ids=[uuid.uuid4().hex for _ in specs],
                       params=self.params.sampling(), conversation_id=self.conversation_id, title=title[:60],
                       user_text=user_text)

    def _start(self, request: Request, user_message) -> None:
        self.request = request
        self.generations += 1
        self._user_message = user_message
        self.log_view.add_replies([label_of(s) for s in request.specs], request.request_ids)
        self.generate(request)

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat")
    def generate(self, req: Request) -> None:
        b = self.backend
        conversations = b.conversations
        if req.conversation_id is None:
            conv = conversations.create(req.title, model=self.model or "", adapter=self.adapter or "")
            req.conversation_id = conv.id
            self.app.call_from_thread(setattr, self, "conversation_id", conv.id)
        if req.user_text is not None:
            saved = conversations.add_message(req.conversation_id, "user", req.user_text)
            self.app.call_from_thread(setattr, self._user_message, "message_id", saved.id)
        results = b.chat(req.specs, req.messages, req.params, request_ids=req.request_ids,
                         on_event=self.log_view.events.push, cancel=req.cancel)
        for side, (request_id, done) in enumerate(zip(req.request_ids, results)):
            meta = b.reply_meta(done, side="b" if side else "a")
            saved = conversations.add_message(req.conversation_id, "assistant", done.text, meta)
            # textual types the callback as `T | Awaitable[T]`, which mypy cannot solve for a coroutine of None
            self.app.call_from_thread(self._finished, request_id, done.text, meta, saved.id)  # type: ignore[arg-type]

    async def _finished(self, request_id: str, text: str, meta: dict[str, Any], message_id: int) -> None:
        await self.log_view.drain()
        reply = await self.log_view.finish(request_id, text=text, meta=meta)
        if reply is not None:
            reply.message_id = message_id
        usage = meta.get("usage") or {}
        self.query_one(ContextMeter).set_usage(used=usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0),
                                               dropped=meta.get("dropped_messages", 0))

    async def _drain(self, show: bool | None = None) -> None:
        """Every 1/UI_HZ s. A redraw of a streaming reply is mostly a repaint of a few lines, but
        when the reply needs more lines, or a finished block becomes Markdown, it lays the screen
        out (10 to 40 ms under load), and a key that comes meanwhile waits for it. So while the
        user types the text is held back here and drawn by `after_key`."""
        if show is None:
            show = not self.hypr.typing()
        if show:
            self._shown = time.monotonic()
        for event in await self.log_view.drain(show=show):
            dropped = getattr(event, "dropped_messages", None)
            if dropped is not None and hasattr(event, "window"):
                self.query_one(ContextMeter).set_usage(dropped=dropped, window=event.window)

    def after_key(self) -> None:
        """A key's frame is on the terminal (`HyprApp._after_key`): while the user types, held-back
        reply text is drawn here, at TYPING_HZ at most."""
        if self.log_view.streaming and time.monotonic() - self._shown >= 1 / TYPING_HZ:
            self.call_later(self._drain, True)

    def worker_finished(self, worker: Worker, state: WorkerState) -> None:
        if worker.group == "chat":
            self.call_later(self._close_replies)

    async def _close_replies(self) -> None:
        """The generation worker ended: close replies it did not finish (it failed or was cancelled)."""
        await self.log_view.drain()
        for request_id in list(self.log_view.pending):
            await self.log_view.finish(request_id, text=None, meta=None)
        self.request = None

    def action_stop(self) -> None:
        if self.request is not None:
            self.request.cancel.set()

    # ---- regenerate, edit, conversations -------------------------------------------------------
    def action_regenerate(self) -> None:
        if self.log_view.streaming:
            return
        last_user = self.log_view.last_user()
        if last_user is None:
            return
        messages = self.log_view.messages()
        upto = messages.index(last_user) + 1
        if messages[upto:]:
            self._forget(self.log_view.remove_from(messages[upto]))
        request = self._request(None, messages[:upto])
        if request is not None:
            self._start(request, last_user)

    def action_edit_last(self) -> None:
        if self.log_view.streaming:
            return
        last_user = self.log_view.last_user()
        if last_user is None:
            return
        text = last_user.text
        self._forget(self.log_view.remove_from(last_user))
        prompt = self.query_one("#chat-input", Input)
        prompt.value = text
        prompt.focus()

    def action_pick_commit(self) -> None:
        if self.model is None or self.adapter is None:
            self.notify("Pick an adapter first: its commits are what can answer.", severity="warning")
            return
        self.pick_commit(self.model, self.adapter)

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat-targets")
    def pick_commit(self, model: str, adapter: str) -> None:
        from hyprstream_tui import units

        commits = [c for c in self.backend.log(model, adapter) if c.kind in ("checkpoint", "rollback")]
        options = [(f"{c.short}  {c.summary}  loss {units.metric(c.metrics.get('loss'))}  {' '.join(c.tags)}", c.sha)
                   for c in commits]
        options.insert(0, ("the branch tip (follows new checkpoints)", ""))
        self.app.call_from_thread(self.app.push_screen, PickDialog(f"Chat with a commit of {adapter}", options),
                                  self._picked_commit)

    def _picked_commit(self, sha: str | None) -> None:
        if sha is not None:
            self.rev = sha or None
            self._show_target_label()

    def action_toggle_params(self) -> None:
        self.params.toggle_class("hidden")

    def action_toggle_compare(self) -> None:
        self.compare = not self.compare
        self._show_target_label()
        self.notify("Compare mode on: each prompt is answered by both targets." if self.compare else "Compare mode off.")

    def action_toggle_provenance(self) -> None:
        self.log_view.set_provenance(not self.log_view.show_provenance)

    # ---- chat, correct, train ------------------------------------------------------------------
    def action_to_training(self) -> None:
        reply, user, model = self.log_view.last_reply(), self.log_view.last_user(), self.model
        if reply is None or user is None or model is None:
            self.notify("Nothing to send yet: chat first, then send the reply (edited if you like) to training.",
                        severity="warning")
            return
        fields = [Field("adapter", "Adapter (on this model)", self.adapter or ""), Field("input", "Prompt", user.text),
                  Field("output", "Answer to learn (edit it first if it needs correcting)", reply.text, multiline=True)]
        self.app.push_screen(FormDialog("Send to training", fields, submit="Add sample", check=_check_training_row),
                             when_given(lambda v: self.add_training_row(model, v)))

    @work(thread=True, exclusive=False, exit_on_error=False, group="chat-train")
    def add_training_row(self, model: str, values: dict[str, Any]) -> None:
        total = self.backend.add_samples(model, values["adapter"], [values["row"]])
        self.app.call_from_thread(self.notify, f"Added to {values['adapter']!r}: it has {total} samples. "
                                  "Train it on the Training screen (F3).")


def _check_training_row(values: dict[str, str]) -> dict[str, Any]:
    from hyprstream_tui.engine.train.data import check_row

    if not values["adapter"].strip():
        raise InvalidInput("Name the adapter that should learn this (create one on the Training screen).")
    return {"adapter": values["adapter"].strip(),
            "row": check_row({"input": values["input"], "output": values["output"]}, "The sample")}
