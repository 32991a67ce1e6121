"""What the batcher (`batching.py`) and its scheduler threads (`scheduler.py`) share.

- `Ticket`: a checked request waiting for, or holding, a batch row.
- `RowJoined` / `RowLeft`: the batch's own events, beside the engine's.
- `BatchHost`: the narrow face the batcher shows a scheduler: its condition, whether it is
  closing, and where a scheduler delivers events, hands back finished tickets and retires. A
  scheduler reaches the batcher through nothing else, and the batcher reaches a scheduler only
  through `Scheduler.enqueue/accepting/cancel_all/join`.

Never imports torch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Protocol

from hyprstream_tui.engine.events import Event
from hyprstream_tui.engine.jobs import Job

if TYPE_CHECKING:
    from hyprstream_tui.engine.loader import LoadedModel, ModelSource
    from hyprstream_tui.engine.params import SamplingParams

IDLE_LINGER_S = 2.0  # a scheduler with nothing to do waits this long before its thread ends


@dataclass(frozen=True, kw_only=True)
class RowJoined:
    """A request entered the decode batch after its prefill (`step`: decode steps run so far)."""

    request_id: str
    step: int
    rows: int  # batch size once it joined
    prompt_tokens: int


@dataclass(frozen=True, kw_only=True)
class RowLeft:
    """A request left the batch. For a cancelled one, `cancel_step` is the step count when it was
    cancelled, so `step - cancel_step` is the decode steps it took to stop (at most 1)."""

    request_id: str
    step: int
    reason: str  # stop | eos | length | cancelled | error
    tokens: int
    cancel_step: int | None = None


BatchEvent = Event | RowJoined | RowLeft
BatchListener = Callable[[BatchEvent], None]


@dataclass(kw_only=True, eq=False)
class Ticket:
    """A checked request waiting for (or holding) a batch row."""

    request_id: str
    prompt_ids: list[int]
    params: "SamplingParams"
    seed: int
    emit: BatchListener  # the request's own callback: its events and its RowJoined
    job: Job
    lm: "LoadedModel"
    source: "ModelSource"  # the model and adapter, with their commits
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[int, Hashable]:
        """The scheduler it belongs to: one per (loaded model, adapter)."""
        adapter = self.source.adapter
        return (id(self.lm), adapter.key if adapter else None)


class BatchHost(Protocol):
    """What a scheduler may use of the batcher that started it."""

    @property
    def condition(self) -> threading.Condition:
        """Guards every scheduler's waiting queue; notified when tickets arrive or on close."""
        ...

    @property
    def closing(self) -> bool: ...

    @property
    def max_batch(self) -> int: ...

    def deliver(self, ticket: Ticket | None, event: BatchEvent) -> None:
        """To the ticket's own callback (if any) and to every listener."""
        ...

    def release(self, ticket: Ticket) -> None:
        """The ticket's job has its outcome: finish it and free its slot (once)."""
        ...

    def retire(self, key: tuple[int, Hashable], scheduler: object) -> None:
        """Under `condition`: `scheduler` is ending and takes no more tickets."""
        ...


__all__ = ["BatchEvent", "BatchHost", "IDLE_LINGER_S", "RowJoined", "RowLeft", "Ticket"]
