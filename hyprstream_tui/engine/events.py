"""What the engine reports: small frozen dataclasses delivered to a callback.

Every event carries the `request_id` of the generation it belongs to, so one callback can serve
several concurrent requests (a chat screen answering with base and adapter side by side).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

FinishReason = Literal["stop", "eos", "length", "cancelled"]


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Which weights and settings produced a reply: enough to reproduce it."""

    model: str
    model_commit: str | None
    adapter: str | None = None
    adapter_commit: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = ""
    device: str = ""
    quantize: str | None = None


@dataclass(frozen=True, kw_only=True)
class Timings:
    """Seconds spent, and the rates they imply (0 when nothing was measured)."""

    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of prefill; the decode loop makes the rest.
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 and steps else 0.0


@dataclass(frozen=True, kw_only=True)
class ContextTrimmed:
    """The conversation did not fit the window: the oldest messages were left out of the prompt."""

    request_id: str
    dropped_messages: int
    dropped_tokens: int
    prompt_tokens: int
    window: int


@dataclass(frozen=True, kw_only=True)
class TokenDelta:
    """New text to show: never half a character, never any part of a stop string."""

    request_id: str
    text: str
    tokens: int  # tokens generated so far


@dataclass(frozen=True, kw_only=True)
class GenerationDone:
    request_id: str
    text: str
    finish_reason: FinishReason
    provenance: Provenance
    timings: Timings
    stop: str | None = None  # the stop string that ended it, if any
    dropped_messages: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.timings.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.timings.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (for `infer --json` and saved conversations)."""
        t = self.timings
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stop": self.stop,
            "dropped_messages": self.dropped_messages,
            "provenance": asdict(self.provenance),
            "usage": {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens},
            "timings": {
                "load_s": round(t.load_s, 4),
                "prefill_s": round(t.prefill_s, 4),
                "decode_s": round(t.decode_s, 4),
                "prefill_tok_s": round(t.prefill_tok_s, 2),
                "decode_tok_s": round(t.decode_tok_s, 2),
            },
        }


@dataclass(frozen=True, kw_only=True)
class GenerationError:
    """A request failed. `message` is one line; `kind` names the HyprError subclass (or "bug")."""

    request_id: str
    message: str
    kind: str
    exit_code: int = 1


@dataclass(frozen=True, kw_only=True)
class ModelLoaded:
    request_id: str
    model: str
    model_commit: str | None
    seconds: float
    dtype: str
    device: str
    quantize: str | None = None


Event = ContextTrimmed | TokenDelta | GenerationDone | GenerationError | ModelLoaded
EventCallback = Callable[[Event], None]
