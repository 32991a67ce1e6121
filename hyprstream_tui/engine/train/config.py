"""Training configuration: a frozen, keyword-only dataclass validated on construction.

`steps` (or `epochs`) is the length of one *run*: one warm-up + cosine-decay schedule. A run that
was stopped is resumed by the next start (same schedule, same data order); a finished run is
followed by a new one that continues the step count, the adapter weights and the optimizer moments.
What is left out (`learning_rate`, the run's length) comes from the data and the model: see
defaults.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hyprstream_tui.engine.train.defaults import DEFAULT_BATCH_SIZE, default_steps
from hyprstream_tui.errors import InvalidInput

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Values that shape a run's schedule or data order: a resumed run keeps the ones it started with.
RUN_KEYS = ("learning_rate", "batch_size", "total_steps", "warmup_steps", "min_lr_ratio", "weight_decay",
            "grad_clip", "max_seq_len", "seed")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train. Either `steps` or `epochs` sets the length of a run (default: 3 epochs, at
    least 60 steps); `learning_rate` None is the default rule's (defaults.py), fixed when a run starts."""

    learning_rate: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    steps: int | None = None
    epochs: float | None = None
    checkpoint_every: int = 50
    max_seq_len: int = 512
    warmup_steps: int | None = None  # default: 10% of the run, at most 100
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 switches clipping off
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # auto: the checkpoint's own (fp32 for bf16/fp16 weights on a CPU without bf16)
    tag_best: bool = False
    new_run: bool = False  # start a new schedule even if the last run was stopped part-way
    nproc: int = 1  # training processes on this host (engine/train/distributed.py); batch_size is per process

    def __post_init__(self) -> None:
        # Errors name the setting (`batch_size`): each front end words it its own way (errors.py).
        if self.learning_rate is not None:
            self._check_learning_rate()
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.checkpoint_every, "checkpoint_every")
        _positive_int(self.nproc, "nproc")
        _positive_int(self.max_seq_len, "max_seq_len")
        if self.max_seq_len < 8:
            raise InvalidInput(f"`max_seq_len` must be at least 8 tokens, got {self.max_seq_len}.")
        if self.steps is not None and self.epochs is not None:
            raise InvalidInput("Give `steps` or `epochs`, not both.")
        if self.steps is not None:
            _positive_int(self.steps, "steps")
        if self.epochs is not None:
            _positive_number(self.epochs, "epochs")
        if self.warmup_steps is not None:
            _int(self.warmup_steps, "warmup_steps")
            if self.warmup_steps < 0:
                raise InvalidInput(f"`warmup_steps` must be 0 or more, got {self.warmup_steps}.")
        _number(self.min_lr_ratio, "min_lr_ratio")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InvalidInput(f"`min_lr_ratio` must be between 0 and 1, got {self.min_lr_ratio}.")
        _number(self.weight_decay, "weight_decay")
        if self.weight_decay < 0:
            raise InvalidInput(f"`weight_decay` must be 0 or more, got {self.weight_decay}.")
        _number(self.grad_clip, "grad_clip")
        if self.grad_clip < 0:
            raise InvalidInput(f"`grad_clip` must be 0 (off) or more, got {self.grad_clip}.")
        _int(self.seed, "seed")
        if not 0 <= self.seed < 2**63:
            raise InvalidInput(f"`seed` must be between 0 and 2**63-1, got {self.seed}.")
        if self.dtype not in DTYPES:
            raise InvalidInput(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if not isinstance(self.device, str) or not self.device.split(":")[0] in ("cpu", "cuda", "mps"):
            raise InvalidInput(f"`device` must be cpu, cuda, cuda:N or mps, got {self.device!r}.")

    def _check_learning_rate(self) -> None:
        _positive_number(self.learning_rate, "learning_rate")
        if self.learning_rate > 1:  # type: ignore[operator]
            raise InvalidInput(f"`learning_rate` {self.learning_rate} is far too large: LoRA uses about 1e-4 to 3e-2.")

    def run_steps(self, steps_per_epoch: int) -> int:
        """The length of a new run, given how many steps one pass over the samples takes."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * steps_per_epoch))
        return default_steps(steps_per_epoch)

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return min(100, total_steps // 10)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(step_in_run: int, *, learning_rate: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for the `step_in_run`-th step (0-based) of a run: linear warm-up from
    lr/warmup to lr, then cosine decay to lr * min_lr_ratio at the run's last step."""
    if warmup_steps > 0 and step_in_run < warmup_steps:
        return learning_rate * (step_in_run + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step_in_run - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return learning_rate * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def _number(value: object, setting: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"`{setting}` must be a number, got {value!r}.")


def _positive_number(value: object, setting: str) -> None:
    _number(value, setting)
    if value <= 0:  # type: ignore[operator]
        raise InvalidInput(f"`{setting}` must be greater than 0, got {value}.")


def _int(value: object, setting: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"`{setting}` must be a whole number, got {value!r}.")


def _positive_int(value: object, setting: str) -> None:
    _int(value, setting)
    if value <= 0:  # type: ignore[operator]
        raise InvalidInput(f"`{setting}` must be at least 1, got {value}.")
