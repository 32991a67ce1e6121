"""Continuous batching: concurrent requests share decode steps.

`Batcher.submit` checks a request where the caller is (unknown model, bad parameters, too long a
prompt and a full queue all raise there, before any HTTP response has started), then hands it to
the scheduler thread of its (loaded model, adapter). A scheduler keeps a batch of active rows;
each loop it

1. admits waiting requests: each is prefilled alone, samples its first token and merges its KV
   row into the batch cache (`batch_cache.BatchCache`, left-padded, per-row positions);
2. drops rows whose cancel token is set (a client that hung up) before spending a step on them;
3. runs ONE forward over the last token of every row, samples each row with its own parameters
   and seeded generator, and streams its text through its own detokeniser and stop matcher;
4. lets finished rows leave at once: nobody waits for the slowest request.

Rows report with the engine's events (`TokenDelta`, `GenerationDone`, `GenerationError`), plus
`RowJoined` / `RowLeft`, which say at which decode step a row entered and left the batch (a
cancelled row also says at which step it was cancelled: it leaves within one step).

Importing this module does not import torch; the scheduler threads do.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from hyprstream_tui.engine.events import Event, EventCallback, GenerationDone, GenerationError
from hyprstream_tui.engine.loader import AdapterSource, LoadedModel
from hyprstream_tui.engine.params import SamplingParams, check_prompt
from hyprstream_tui.engine.sources import ModelSpec, is_path, parse_spec
from hyprstream_tui.errors import HyprError, InvalidInput

IDLE_LINGER_S = 2.0  # a scheduler with nothing to do waits this long before its thread ends


class ContextLengthExceeded(InvalidInput):
    """The prompt plus the tokens asked for do not fit the model's context window."""


class Overloaded(HyprError):
    """Every batch row and queue slot is taken: try again shortly."""

    exit_code = 4


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


class BatchJob:
    """A submitted request: cancel it, wait for it, or take its result (which raises its error)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.cancel_token = threading.Event()
        self.cancel_step: int | None = None
        self.done: GenerationDone | None = None
        self.error: BaseException | None = None
        self.prompt_tokens = 0
        self._finished = threading.Event()
        self._steps: Callable[[], int] = lambda: 0

    def cancel(self) -> None:
        if not self.cancel_token.is_set():
            self.cancel_step = self._steps()
            self.cancel_token.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None) -> GenerationDone:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"Request {self.request_id} is still running.")
        if self.error is not None:
            raise self.error
        assert self.done is not None
        return self.done


@dataclass(kw_only=True, eq=False)
class Ticket:
    """A checked request waiting for (or holding) a batch row."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    emit: EventCallback
    job: BatchJob
    lm: LoadedModel
    model_name: str
    model_commit: str | None
    adapter: AdapterSource | None
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """Continuous batching over an `Engine`'s loaded models. Thread-safe.

    max_batch: rows decoded together per (model, adapter); max_queue: requests that may wait for
    a row beyond those. A request beyond both raises `Overloaded` (HTTP 503).
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 32,
        on_event: EventCallback | None = None,
        allow_paths: bool = False,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInput(f"max_batch must be at least 1, got {max_batch!r}.")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise InvalidInput(f"max_queue must be 0 or more, got {max_queue!r}.")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.allow_paths = allow_paths
        self._listeners: list[Callable[[BatchEvent], None]] = [on_event] if on_event else []
        self._lock = threading.Condition()
        self._schedulers: dict[tuple, Any] = {}
        self._in_flight = 0  # submitted and not finished: being checked, waiting or decoding
        self._tokenizer_lock = threading.Lock()
        self._closed = False

    # ---- public API -------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[BatchEvent], None]) -> None:
        """`callback` sees every event of every request (from scheduler threads)."""
        self._listeners.append(callback)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(
        self,
        spec: str | ModelSpec,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        params: SamplingParams = SamplingParams(),
        on_event: EventCallback | None = None,
        request_id: str | None = None,
        fill_window: bool = False,
    ) -> BatchJob:
        """Check and queue one request; its events go to `on_event` and to the listeners.

        Blocks while the model loads. With `fill_window`, `params.max_tokens` is a cap and the
        request may use whatever the context window leaves after the prompt.
        """
        spec = self.check_spec(spec)
        self._reserve()
        try:
            ticket = self._ticket(spec, prompt, messages, params, on_event, request_id, fill_window)
            self._enqueue(ticket)
        except BaseException:
            self._release()
            raise
        return ticket.job

    def close(self) -> None:
        """Cancel everything and let the scheduler threads end."""
        with self._lock:
            self._closed = True
            schedulers = list(self._schedulers.values())
            self._lock.notify_all()
        for scheduler in schedulers:
            scheduler.cancel_all()
        for scheduler in schedulers:
            scheduler.join(timeout=10)

    # ---- checking a request -----------------------------------------------------------------
    def check_spec(self, spec: str | ModelSpec) -> ModelSpec:
        """`spec` parsed; folder paths are refused unless `allow_paths` (a server takes names only)."""
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        if not self.allow_paths and (is_path(spec.model) or is_path(spec.adapter or "")):
            raise InvalidInput(
                "Models are served from the local store only: give a model name (see GET /v1/models), "
                "not a path."
            )
        return spec

    def _reserve(self) -> None:
        with self._lock:
            if self._closed:
                raise Overloaded("The server is shutting down: try again later.")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise Overloaded(
                    f"The server is busy ({self._in_flight} requests running or queued): "
                    "retry in a moment."
                )
            self._in_flight += 1

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _ticket(self, spec, prompt, messages, params, on_event, request_id, fill_window) -> Ticket:
        source = self.engine.resolve(spec)
        lm: LoadedModel = self.engine.load(spec)
        if source.adapter is not None:
            with lm.lock:  # attach now, so a misfit adapter is an error before any response
                lm.use_adapter(source.adapter)
        with self._tokenizer_lock:
            prompt_ids = self._prompt_ids(lm, prompt, messages)
        params = self._fit_budget(lm, len(prompt_ids), params, fill_window)
        request_id = request_id or uuid.uuid4().hex[:12]
        job = BatchJob(request_id)
        job.prompt_tokens = len(prompt_ids)
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        return Ticket(
            request_id=request_id, prompt_ids=prompt_ids, params=params, seed=seed,
            emit=on_event or _ignore, job=job, lm=lm, model_name=source.name,
            model_commit=source.commit, adapter=source.adapter,
        )

    @staticmethod
    def _prompt_ids(lm: LoadedModel, prompt: str | None, messages) -> list[int]:
        if messages is None:
            return list(lm.tokenizer.encode(check_prompt(prompt)))
        from hyprstream_tui.engine.chat import check_messages, render

        return render(lm.tokenizer, check_messages(messages))

    @staticmethod
    def _fit_budget(lm: LoadedModel, n_prompt: int, params: SamplingParams, fill_window: bool):
        """Params whose max_tokens fit the window; never a silent truncation of the prompt."""
        import dataclasses

        room = lm.window - n_prompt
        max_tokens = min(params.max_tokens, room) if fill_window else params.max_tokens
        if room < 1 or max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {lm.window} tokens. However, you requested "
                f"{n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the prompt, "
                f"{max(max_tokens, 1)} for the completion). Please reduce the prompt or max_tokens."
            )
        if max_tokens == params.max_tokens:
            return params
        return dataclasses.replace(params, max_tokens=max_tokens)

    # ---- scheduling -------------------------------------------------------------------------
    def _enqueue(self, ticket: Ticket) -> None:
        key = (id(ticket.lm), ticket.adapter.key if ticket.adapter else None)
        with self._lock:
            scheduler = self._schedulers.get(key)
            if scheduler is None or not scheduler.accepting:
                from hyprstream_tui.engine.scheduler import Scheduler

                scheduler = Scheduler(self, ticket.lm, ticket.adapter, key)
                self._schedulers[key] = scheduler
                scheduler.start()
            ticket.job._steps = scheduler.step_count
            scheduler.waiting.append(ticket)
            self._lock.notify_all()

    def _emit(self, ticket: Ticket | None, event: BatchEvent) -> None:
        """Deliver to the request and to every listener; a failing callback never stops decoding."""
        targets = ([ticket.emit] if ticket is not None else []) + list(self._listeners)
        for callback in targets:
            try:
                callback(event)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - a consumer's bug must not kill the batch
                pass

    def _finished(self, ticket: Ticket) -> None:
        """Called once per ticket by its scheduler: wakes waiters, frees the slot."""
        if not ticket.job._finished.is_set():
            ticket.job._finished.set()
            self._release()

    def _retire(self, key: tuple, scheduler: Any) -> None:
        """Called under the lock by a scheduler about to end."""
        if self._schedulers.get(key) is scheduler:
            del self._schedulers[key]


def _ignore(event: Event) -> None:
    pass


def error_event(request_id: str, exc: BaseException) -> GenerationError:
    if isinstance(exc, HyprError):
        return GenerationError(request_id=request_id, message=exc.message,
                               kind=type(exc).__name__, exit_code=exc.exit_code)
    return GenerationError(request_id=request_id, kind="bug",
                           message=f"Internal error: {type(exc).__name__}: {exc}")


__all__ = [
    "Batcher", "BatchJob", "ContextLengthExceeded", "Overloaded", "RowJoined", "RowLeft",
]
