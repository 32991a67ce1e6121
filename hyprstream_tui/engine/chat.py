"""Chat prompts: the tokenizer's chat template, fitted into the context window.

When a conversation is longer than the window allows, the oldest turns are left out (the system
message always stays) and the caller is told how many; if even the last user message does not
fit, that is an `InvalidInput`, never a silent truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from hyprstream_tui.engine.params import check_text
from hyprstream_tui.errors import InvalidInput

ROLES = ("system", "user", "assistant")


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


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` followed by the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
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
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, budget: int
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
