"""The scrolling conversation: user messages, replies (one, or two side by side in compare mode),
and the streaming hand-off: engine events go into a buffer from the worker thread and `drain`
applies them a few times a second, re-rendering each streaming reply once per tick."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget

from hyprstream_tui.tui.batch import Buffer
from hyprstream_tui.tui.widgets.chat_message import ChatMessage

if TYPE_CHECKING:
    from hyprstream_tui.engine.events import Event


class ChatLog(VerticalScroll):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.events: Buffer[Event] = Buffer()
        self.pending: dict[str, ChatMessage] = {}  # request id -> streaming reply
        self.show_provenance = False
        self.deltas = 0  # token deltas received (tests check that replies stream)
        self._unshown: set[ChatMessage] = set()  # replies with text drain has not drawn yet

    def on_mount(self) -> None:
        # Stay at the end as replies grow, scrolled in the frame that draws the new text (not
        # in a second one after it); scrolling up lets go, scrolling back to the end holds again.
        self.anchor()

    # ---- building ------------------------------------------------------------------------------
    def clear_log(self) -> None:
        self.pending.clear()
        self._unshown.clear()
        self.events.drain()
        self.remove_children()

    def add_user(self, text: str, *, message_id: int | None = None) -> ChatMessage:
        message = ChatMessage("user", text, label="you", message_id=message_id)
        self.mount(message)
        self.scroll_end(animate=False)
        return message

    def add_replies(self, labels: list[str], request_ids: list[str]) -> list[ChatMessage]:
        """Empty streaming replies: one, or a side-by-side pair for compare mode."""
        replies = [ChatMessage("assistant", label=label, streaming=True) for label in labels]
        for reply, request_id, side in zip(replies, request_ids, "ab"):
            reply.side = side
            self.pending[request_id] = reply
        self._mount_replies(replies)
        return replies

    def add_saved_reply(self, text: str, *, label: str, meta: dict[str, Any], message_id: int, pair_with_last: bool) -> ChatMessage:
        reply = ChatMessage("assistant", text, label=label, meta=meta, message_id=message_id)
        reply.side = "b" if pair_with_last else "a"
        last = self.children[-1] if self.children else None
        if pair_with_last and isinstance(last, ChatMessage) and last.role == "assistant":
            last.remove()
            self._mount_replies([ChatMessage("assistant", last.text, label=last.label, meta=last.meta,
                                             message_id=last.message_id), reply])
        else:
            self._mount_replies([reply])
        return reply

    def _mount_replies(self, replies: list[ChatMessage]) -> None:
        for reply in replies:
            reply.toggle_provenance(self.show_provenance)
        if len(replies) == 1:
            self.mount(replies[0])
        else:
            self.mount(Horizontal(*replies, classes="compare-pair"))
        self.scroll_end(animate=False)

    # ---- reading -------------------------------------------------------------------------------
    def messages(self) -> list[ChatMessage]:
        """User messages and primary replies, in order (the context of the next prompt)."""
        out = []
        for child in self.children:
            if isinstance(child, ChatMessage):
                out.append(child)
            elif isinstance(child, Horizontal):
                first = next(iter(child.query(ChatMessage)), None)
                if first is not None:
                    out.append(first)
        return out

    def all_messages(self) -> Iterable[ChatMessage]:
        return self.query(ChatMessage)

    def last_user(self) -> ChatMessage | None:
        users = [m for m in self.messages() if m.role == "user"]
        return users[-1] if users else None

    def last_reply(self) -> ChatMessage | None:
        replies = [m for m in self.messages() if m.role == "assistant"]
        return replies[-1] if replies else None

    def remove_from(self, message: ChatMessage) -> list[int]:
        """Remove `message` and everything after it; returns the saved ids removed."""
        children = list(self.children)
        parent = message.parent
        top = parent if message not in children and isinstance(parent, Widget) else message  # a compare pair
        start = children.index(top)
        removed = []
        for child in children[start:]:
            removed += [m.message_id for m in ([child] if isinstance(child, ChatMessage) else child.query(ChatMessage))
                        if m.message_id is not None]
            child.remove()
        return removed

    def set_provenance(self, show: bool) -> None:
        self.show_provenance = show
        for message in self.all_messages():
            message.toggle_provenance(show)

    # ---- streaming -----------------------------------------------------------------------------
    async def drain(self, *, show: bool = True) -> list[Event]:
        """Apply buffered engine events; returns the non-token events for the screen. With
        show=False, streamed text is kept for a later drain (or the reply's end) to draw."""
        from hyprstream_tui.engine.events import TokenDelta

        others: list[Event] = []
        touched: set[ChatMessage] = set()
        for event in self.events.drain():
            reply = self.pending.get(getattr(event, "request_id", ""))
            if reply is not None and isinstance(event, TokenDelta):
                reply.append(event.text)
                touched.add(reply)
                self.deltas += 1
            else:
                others.append(event)
        self._unshown |= touched
        if show and self._unshown:
            touched, self._unshown = self._unshown, set()
            for reply in touched:  # the anchor keeps the end in view, in the same frame
                await reply.flush()
        return others

    async def finish(self, request_id: str, *, text: str | None, meta: dict[str, Any] | None) -> ChatMessage | None:
        reply = self.pending.pop(request_id, None)
        if reply is not None:
            self._unshown.discard(reply)
            await reply.finish(text=text, meta=meta)
            reply.toggle_provenance(self.show_provenance)
        return reply

    @property
    def streaming(self) -> bool:
        return bool(self.pending)
