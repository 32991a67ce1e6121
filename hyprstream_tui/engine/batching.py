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

import dataclasses
import threading
from typing import TYPE_CHECKING, Hashable, Mapping, Sequence

from hyprstream_tui.engine.jobs import Job, draw_seed, emit_quietly, ignore, new_request_id
from hyprstream_tui.engine.loader import LoadedModel
from hyprstream_tui.engine.params import SamplingParams, check_prompt
from hyprstream_tui.engine.rows import BatchEvent, BatchListener, RowJoined, RowLeft, Ticket
from hyprstream_tui.engine.sources import ModelSpec, is_path, parse_spec
from hyprstream_tui.errors import HyprError, InvalidInput

if TYPE_CHECKING:
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.scheduler import Scheduler
    from hyprstream_tui.store import Store


_WARM = threading.Event()  # set: no warm-up under way (see start_warm_up)
_WARM.set()


def start_warm_up(store: Store | None = None) -> threading.Thread:
    """Import what a batch's first request needs, in a background thread of a server that has
    just started: torch, transformers' auto classes and tokenizer (batches load through
    transformers' classes, whose cache the scheduler extends), the modeling module of each
    architecture in `store`, and the scheduler. Without it a server's first reply paid about
    2x a cold `infer` (issue 21); `/health` answers before any of this.

    A load waits for it (`_ticket`): transformers' lazy module is not safe to import from two
    threads at once (a request racing the warm-up got "cannot import name 'AutoConfig'")."""
    _WARM.clear()
    thread = threading.Thread(target=_warm_imports, args=(store,), name="hyprstream-warm", daemon=True)
    thread.start()
    return thread


def _warm_imports(store: Store | None) -> None:
    import importlib
    import logging

    try:
        importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
        for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast"):
            getattr(transformers, name)
        for summary in store.list_models() if store is not None else []:
            if summary.architecture.isidentifier() and hasattr(transformers, summary.architecture):
                getattr(transformers, summary.architecture)  # its modeling module
        importlib.import_module("hyprstream_tui.engine.scheduler")
    except Exception as exc:  # noqa: BLE001 - the first request reports any real problem itself
        logging.getLogger(__name__).info("warm-up import failed: %s: %s", type(exc).__name__, exc)
    finally:
        _WARM.set()


class ContextLengthExceeded(InvalidInput):
    """The prompt plus the tokens asked for do not fit the model's context window."""


class Overloaded(HyprError):
    """Every batch row and queue slot is taken: try again shortly."""

    exit_code = 4


class Batcher:
    """Continuous batching over an `Engine`'s loaded models. Thread-safe.

    max_batch: rows decoded together per (model, adapter); max_queue: requests that may wait for
    a row beyond those. A request beyond both raises `Overloaded` (HTTP 503).
    """

    def __init__(
        self,
        engine: "Engine",
        *,
        max_batch: int = 8,
        max_queue: int = 32,
        on_event: BatchListener | None = None,
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
        self._listeners: list[BatchListener] = [on_event] if on_event else []
        self._lock = threading.Condition()
        self._schedulers: dict[tuple[int, Hashable], Scheduler] = {}
        self._in_flight = 0  # submitted and not finished: being checked, waiting or decoding
        self._tokenizer_lock = threading.Lock()
        self._closed = False

    # ---- public API -------------------------------------------------------------------------
    def add_listener(self, callback: BatchListener) -> None:
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
        on_event: BatchListener | None = None,
        request_id: str | None = None,
        fill_window: bool = False,
    ) -> Job:
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

    # ---- what a scheduler sees (rows.BatchHost) ---------------------------------------------
    @property
    def condition(self) -> threading.Condition:
        return self._lock

    @property
    def closing(self) -> bool:
        return self._closed

    def deliver(self, ticket: Ticket | None, event: BatchEvent) -> None:
        """To the request and to every listener; a failing callback never stops decoding."""
        targets: list[BatchListener] = [ticket.emit] if ticket is not None else []
        for callback in targets + list(self._listeners):
            emit_quietly(callback, event)

    def release(self, ticket: Ticket) -> None:
        """Once per ticket, by its scheduler: wakes its waiters, frees its slot."""
        if ticket.job.finish():
            self._release()

    def retire(self, key: tuple[int, Hashable], scheduler: object) -> None:
        if self._schedulers.get(key) is scheduler:
            del self._schedulers[key]

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

    def _ticket(self, spec: ModelSpec, prompt: str | None,
                messages: Sequence[Mapping[str, str]] | None, params: SamplingParams,
                on_event: BatchListener | None, request_id: str | None, fill_window: bool) -> Ticket:
        source = self.engine.resolve(spec)
        _WARM.wait()  # a server's warm-up imports what this load imports: not both at once
        # A batch stacks rows of transformers' caches (tuned.batch_cache): transformers' classes
        lm = self.engine.load(spec, dataclasses.replace(self.engine.options, native=False))
        if source.adapter is not None:
            with lm.lock:  # attach now, so a misfit adapter is an error before any response
                lm.use_adapter(source.adapter)
        with self._tokenizer_lock:
            prompt_ids = self._prompt_ids(lm, prompt, messages)
        params = self._fit_budget(lm, len(prompt_ids), params, fill_window)
        request_id = request_id or new_request_id()
        job = Job(request_id)
        job.prompt_tokens = len(prompt_ids)
        return Ticket(request_id=request_id, prompt_ids=prompt_ids, params=params,
                      seed=draw_seed(params.seed), emit=on_event or ignore, job=job, lm=lm,
                      source=source)

    @staticmethod
    def _prompt_ids(lm: LoadedModel, prompt: str | None,
                    messages: Sequence[Mapping[str, str]] | None) -> list[int]:
        if messages is None:
            return list(lm.tokenizer.encode(check_prompt(prompt)))
        from hyprstream_tui.engine.chat import check_messages, render

        return render(lm.tokenizer, check_messages(messages))

    @staticmethod
    def _fit_budget(lm: LoadedModel, n_prompt: int, params: SamplingParams,
                    fill_window: bool) -> SamplingParams:
        """Params whose max_tokens fit the window; never a silent truncation of the prompt."""
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
        key = ticket.key
        with self._lock:
            scheduler = self._schedulers.get(key)
            if scheduler is None or not scheduler.accepting:
                from hyprstream_tui.engine.scheduler import Scheduler

                scheduler = Scheduler(self, ticket.lm, ticket.source.adapter, key)
                self._schedulers[key] = scheduler
                scheduler.start()
            scheduler.enqueue(ticket)
            self._lock.notify_all()


__all__ = [
    "Batcher", "ContextLengthExceeded", "Overloaded", "RowJoined", "RowLeft",
]
