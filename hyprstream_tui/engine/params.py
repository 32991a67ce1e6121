"""Sampling parameters: a frozen, keyword-only dataclass validated on construction.

Every rule a user can break is checked here (or, for what depends on the model's window, in
`check_budget`) and raises `InvalidInput` with one line that says what to do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from hyprstream_tui.errors import InvalidInput

MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy; top_k 0 / top_p 1 switch those off."""

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        _number(self.temperature, "temperature")
        if self.temperature < 0:
            raise InvalidInput(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        _number(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}.")
        _integer(self.top_k, "top_k")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0 switches it off), got {self.top_k}.")
        _number(self.min_p, "min_p")
        if not 0 <= self.min_p < 1:
            raise InvalidInput(f"min_p must be in [0, 1), got {self.min_p}.")
        _number(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            raise InvalidInput(
                "repetition_penalty must be > 0 (1 switches it off), "
                f"got {self.repetition_penalty}."
            )
        _integer(self.max_tokens, "max_tokens")
        if self.max_tokens <= 0:
            raise InvalidInput(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.seed is not None:
            _integer(self.seed, "seed")
            if not 0 <= self.seed <= MAX_SEED:
                raise InvalidInput(f"seed must be between 0 and 2**63-1, got {self.seed}.")
        self._check_stop()

    def _check_stop(self) -> None:
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, (tuple, list)):
            raise InvalidInput("stop must be a list of strings.")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidInput(f"At most {MAX_STOP_STRINGS} stop strings, got {len(stop)}.")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidInput(f"Each stop string must be non-empty text, got {s!r}.")
            check_text(s, "stop string")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict:
        """Plain values, for provenance records and JSON output."""
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data


def _number(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number, got {value!r}.")


def _integer(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be a whole number, got {value!r}.")


def check_text(text: object, what: str = "prompt") -> str:
    """Text the tokenizer can take: a str that is valid Unicode (no lone surrogates)."""
    if not isinstance(text, str):
        raise InvalidInput(f"The {what} must be text, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"The {what} contains an invalid character (a lone surrogate at position {exc.start}): "
            "fix the text's encoding."
        ) from None
    return text


def check_prompt(text: object) -> str:
    """A prompt: valid Unicode and not empty."""
    text = check_text(text, "prompt")
    if not text.strip():
        raise InvalidInput("The prompt is empty: give some text to continue.")
    return text


def check_budget(*, prompt_tokens: int, max_tokens: int, window: int) -> None:
    """The prompt plus the tokens asked for must fit the model's context window."""
    if max_tokens >= window:
        raise InvalidInput(
            f"max_tokens {max_tokens} is beyond the model's context window of {window} tokens: "
            f"ask for fewer."
        )
    if prompt_tokens + max_tokens > window:
        raise InvalidInput(
            f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context window of {window} tokens: shorten the prompt or lower max_tokens."
        )
