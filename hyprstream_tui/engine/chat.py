"""Chat prompts: the tokenizer's chat template, fitted into the context window.

When a conversation is longer than the window allows, the oldest turns are left out (the system
message always stays) and the caller is told how many; if even the last user message does not
fit, that is an `InvalidInput`, never a silent truncation.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from hyprstream_tui.engine.params import check_text
from hyprstream_tui.errors import InvalidInput

if TYPE_CHECKING:
    from hyprstream_tui.engine.loader import Tokenizer

ROLES = ("system", "user", "assistant")
TEMPLATE_SECONDS = 2.0  # a chat template renders in milliseconds; a hostile one loops forever
TEMPLATE_MEMORY = 256 << 20  # ... or doubles a list until the machine swaps
TEMPLATE_GRACE_S = 0.02


class TemplateBudgetExceeded(Exception):
    pass


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return 0


@contextmanager
def template_budget(seconds: float | None = None, memory: int | None = None) -> Iterator[None]:
    """Stop a Jinja chat template that runs longer than `seconds` or grows this process by more
    than `memory` bytes: every line of the compiled template (a frame of file "<template>") checks
    this thread's CPU time (a thread waiting for the GIL on a busy server is not charged); past
    TEMPLATE_GRACE_S (a real template is done by then, and memory cannot grow faster than it can
    be written) it also checks the process's size. Jinja's
    sandbox blocks attribute escapes and huge ranges, not nested loops or doubling lists. A single
    huge operation (`'x' * 10**9`) is not interrupted."""
    seconds = TEMPLATE_SECONDS if seconds is None else seconds
    memory = TEMPLATE_MEMORY if memory is None else memory
    started = time.thread_time()
    deadline, watch_from = started + seconds, started + TEMPLATE_GRACE_S
    ceiling: list[int] = []  # the size at the first check, plus `memory`

    def line(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
        if event == "line":
            now = time.thread_time()
            if now > deadline:
                raise TemplateBudgetExceeded(f"the chat template ran longer than {seconds:g} s")
            if now > watch_from:
                if not ceiling:
                    ceiling.append(_rss() + memory)
                if _rss() > ceiling[0]:
                    raise TemplateBudgetExceeded(f"the chat template used more than {memory >> 20} MiB")
        return line

    def call(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        return line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(previous)


@dataclass(frozen=True, kw_only=True)
class ChatPrompt:
    ids: list[int]
    dropped_messages: int
    dropped_tokens: int  # tokens the full conversation would have needed beyond what was kept
    kept_messages: int


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts; the last one must be from the user."""
    if not messages:
        raise InvalidInput("The conversation is empty: add a user message.")
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidInput(f"Message {i} has role {role!r}: use system, user or assistant.")
        out.append({"role": role, "content": check_text(content, f"message {i}")})
    if out[-1]["role"] != "user":
        raise InvalidInput("The last message must be from the user.")
    if not out[-1]["content"].strip():
        raise InvalidInput("The last user message is empty: type something to send.")
    return out


def render(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        try:
            with template_budget():
                # tokenize=False returns a str; transformers types every variant's result as one union
                text: str = tokenizer.apply_chat_template(  # type: ignore[assignment]
                    list(messages), tokenize=False, add_generation_prompt=True
                )
        except Exception as exc:  # jinja's TemplateError: e.g. Gemma refuses a system message
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidInput(
                f"The model's chat template refused this conversation ({first}): "
                "adjust the messages (some models take no system prompt)."
            ) from None
    else:  # a base model without a template: a plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer.encode(text, add_special_tokens=False))


def fit_conversation(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, budget: int
) -> ChatPrompt:
    """The prompt for the longest suffix of the conversation that fits `budget` tokens.

    Leading system messages are always kept. Turns are dropped from the oldest, and a kept part
    always starts at a user message.
    """
    messages = check_messages(messages)
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    system, turns = messages[:n_system], messages[n_system:]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
    full = render(tokenizer, messages)
    if len(full) <= budget:
        return ChatPrompt(
            ids=full, dropped_messages=0, dropped_tokens=0, kept_messages=len(messages)
        )
    # Token counts shrink as more is dropped, so binary-search the first start that fits.
    lo, hi, best = 0, len(starts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = render(tokenizer, system + turns[starts[mid] :])
        if len(ids) <= budget:
            best, hi = (starts[mid], ids), mid - 1
        else:
            lo = mid + 1
    if best is None:
        last = render(tokenizer, system + turns[starts[-1] if starts else 0 :])
        raise InvalidInput(
            f"The last message needs {len(last)} tokens with the system prompt, more than the "
            f"{budget} the context window leaves: shorten it or lower max_tokens."
        )
    start, ids = best
    return ChatPrompt(
        ids=ids,
        dropped_messages=start,
        dropped_tokens=len(full) - len(ids),
        kept_messages=len(system) + len(turns) - start,
    )
