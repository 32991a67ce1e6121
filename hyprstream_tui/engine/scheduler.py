"""The scheduler thread of one (loaded model, adapter): admit, drop the cancelled, step, retire.

See `batching.py` for the picture. Each row mirrors `generate.stream_text` exactly (EOS is not
emitted, stop strings are held back and never emitted, the detokeniser never splits a character,
the tail is flushed at the end), so a request's text is the same batched or alone.

Imports torch at module level: `Batcher` imports this lazily, when the first request arrives.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from hyprstream_tui.engine.tuned.batch_cache import BatchCache, batchable
from hyprstream_tui.engine.batching import IDLE_LINGER_S, RowJoined, RowLeft, Ticket, error_event
from hyprstream_tui.engine.detok import IncrementalDetokenizer
from hyprstream_tui.engine.events import GenerationDone, Provenance, Timings, TokenDelta
from hyprstream_tui.engine.generate import new_cache, prefill
from hyprstream_tui.engine.sampling import sample
from hyprstream_tui.engine.stops import StopMatcher

if TYPE_CHECKING:
    from hyprstream_tui.engine.batching import Batcher
    from hyprstream_tui.engine.loader import AdapterSource, LoadedModel


class Row:
    """One request's decoding state: its generator, seen tokens, detokeniser and stop matcher."""

    def __init__(self, ticket: Ticket, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self.ticket = ticket
        self.params = ticket.params
        self.eos_ids = eos_ids
        self.n_prompt = len(ticket.prompt_ids)
        self.seen = torch.empty(self.n_prompt + self.params.max_tokens, dtype=torch.long)  # [S + N]
        self.seen[: self.n_prompt] = torch.tensor(ticket.prompt_ids, dtype=torch.long)
        self.token_ids: list[int] = []
        self.generator = torch.Generator().manual_seed(ticket.seed)
        self.detok = IncrementalDetokenizer(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True), context=ticket.prompt_ids
        )
        self.stops = StopMatcher(self.params.stop)
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.stop: str | None = None
        self.prefill_s = 0.0
        self.decode_s = 0.0

    @property
    def cancelled(self) -> bool:
        return self.ticket.job.cancel_token.is_set()

    @property
    def position(self) -> int:
        """Position of the last token, the one the next step feeds."""
        return self.n_prompt + len(self.token_ids) - 1

    def pick(self, logits: torch.Tensor) -> int:
        """logits: [V] -> the next token id under this row's parameters and generator."""
        seen = self.seen[: self.n_prompt + len(self.token_ids)]
        return sample(logits, self.params, seen=seen, generator=self.generator)

    def accept(self, token_id: int) -> str:
        """Take a sampled token; return the text it releases. Sets `finish_reason` when done."""
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            return ""
        self.seen[self.n_prompt + len(self.token_ids)] = token_id
        self.token_ids.append(token_id)
        text = self.stops.push(self.detok.push(token_id))
        if self.stops.matched is not None:
            self.finish_reason, self.stop = "stop", self.stops.matched
        elif len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self._keep(text)

    def tail(self) -> str:
        """At the end: what the detokeniser and stop matcher still hold (none after a stop)."""
        if self.finish_reason == "stop":
            return ""
        tail = self.stops.push(self.detok.flush())
        if self.stops.matched is not None:
            self.finish_reason, self.stop = "stop", self.stops.matched
        return self._keep(tail + self.stops.flush())

    def _keep(self, text: str) -> str:
        if text:
            self.pieces.append(text)
        return text


class Scheduler(threading.Thread):
    """Decodes every active row of one (model, adapter) together, one token per step."""

    def __init__(self, batcher: "Batcher", lm: "LoadedModel", adapter: "AdapterSource | None",
                 key: tuple) -> None:
        super().__init__(name=f"hyprstream-batch-{lm.source.name}", daemon=True)
        self.batcher, self.lm, self.adapter, self.key = batcher, lm, adapter, key
        self.waiting: deque[Ticket] = deque()  # guarded by batcher._lock
        self.rows: list[Row] = []
        self.kv = BatchCache()
        self.steps = 0
        self.accepting = True
        self.can_batch: bool | None = None  # known after the first prefill
        self.device = next(lm.model.parameters()).device

    def step_count(self) -> int:
        return self.steps

    def cancel_all(self) -> None:
        with self.batcher._lock:
            tickets = list(self.waiting) + [row.ticket for row in list(self.rows)]
        for ticket in tickets:
            ticket.job.cancel()

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        with torch.inference_mode():
            while (admitted := self._take()) is not None:
                pending = deque(admitted)
                try:
                    while pending:
                        self._admit(pending.popleft())
                    self._drop_cancelled()
                    if self.rows:
                        self._step()
                except Exception as exc:  # noqa: BLE001 - a bug: fail what is in flight, go on
                    self._fail_all(exc, list(pending))

    def _take(self) -> list[Ticket] | None:
        """Waiting tickets that fit the batch; None when idle long enough to end the thread."""
        cond = self.batcher._lock
        with cond:
            deadline = time.monotonic() + IDLE_LINGER_S
            while not self.waiting and not self.rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.batcher._closed:
                    self.accepting = False
                    self.batcher._retire(self.key, self)
                    return None
                cond.wait(remaining)
            if self.can_batch is False:
                free = 0 if self.rows else 1
            else:
                free = self.batcher.max_batch - len(self.rows)
            return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]

    def _use_adapter(self) -> None:
        """Under lm.lock: the adapter is shared state of the model, switched per step."""
        self.lm.use_adapter(self.adapter)

    # ---- joining ----------------------------------------------------------------------------
    def _admit(self, ticket: Ticket) -> None:
        """Prefill `ticket` alone, take its first token, and merge its KV row into the batch."""
        row = Row(ticket, self.lm.tokenizer, self.lm.eos_ids)
        if row.cancelled:
            row.finish_reason = "cancelled"
            self._finish(row, joined=False)
            return
        try:
            started = time.perf_counter()
            cache = new_cache(self.lm.model)
            input_ids = row.seen[: row.n_prompt].unsqueeze(0).to(self.device)  # [1, S]
            positions = torch.arange(row.n_prompt, device=self.device).unsqueeze(0)  # [1, S]
            with self.lm.lock:
                self._use_adapter()
                logits = prefill(self.lm.model, input_ids, positions, cache)  # [V]
            token = row.pick(logits.float().cpu())
            row.prefill_s = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - reported to the request, the batch goes on
            self._fail(ticket, exc, joined=False)
            return
        if self.can_batch is None:
            self.can_batch = batchable(cache)
        self._deliver(row, row.accept(token))
        if row.finish_reason is None and row.cancelled:
            row.finish_reason = "cancelled"
        if row.finish_reason is not None:
            self._finish(row, joined=False)
            return
        self.kv.add(cache, row.n_prompt)
        self.rows.append(row)
        self.batcher._emit(ticket, RowJoined(request_id=ticket.request_id, step=self.steps,
                                             rows=len(self.rows), prompt_tokens=row.n_prompt))

    # ---- one decode step --------------------------------------------------------------------
    def _step(self) -> None:
        """ONE forward over the last token of every row; each row samples its own next token."""
        started = time.perf_counter()
        try:
            tokens = torch.tensor([[r.token_ids[-1]] for r in self.rows], device=self.device)  # [B, 1]
            positions = torch.tensor([[r.position] for r in self.rows], device=self.device)  # [B, 1]
            mask = self.kv.step_mask()  # [B, T + 1]
            with self.lm.lock:
                self._use_adapter()
                out = self.lm.model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                                    cache=self.kv.cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float().cpu()  # [B, V]
        except Exception as exc:  # noqa: BLE001 - the batch state is unknown: fail its rows
            self._fail_all(exc, [])
            return
        self.steps += 1
        elapsed = time.perf_counter() - started
        keep = []
        for i, row in enumerate(self.rows):
            row.decode_s += elapsed
            self._deliver(row, row.accept(row.pick(logits[i])))
            if row.finish_reason is None and row.cancelled:
                row.finish_reason = "cancelled"
            if row.finish_reason is None:
                keep.append(i)
            else:
                self._finish(row, joined=True)
        self._keep(keep)

    def _fail_all(self, exc: BaseException, tickets: list[Ticket]) -> None:
        """The batch state is unknown: every row and `tickets` fail, the cache starts afresh."""
        for row in self.rows:
            self._fail(row.ticket, exc, joined=True)
        for ticket in tickets:
            self._fail(ticket, exc, joined=False)
        self.rows, self.kv = [], BatchCache()

    def _drop_cancelled(self) -> None:
        """Rows whose client went away leave before another step is spent on them."""
        keep = []
        for i, row in enumerate(self.rows):
            if row.cancelled:
                row.finish_reason = "cancelled"
                self._finish(row, joined=True)
            else:
                keep.append(i)
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) != len(self.rows):
            self.kv.keep(keep)
            self.rows = [self.rows[i] for i in keep]

    # ---- leaving ----------------------------------------------------------------------------
    def _deliver(self, row: Row, text: str) -> None:
        if text:
            self.batcher._emit(row.ticket, TokenDelta(
                request_id=row.ticket.request_id, text=text, tokens=len(row.token_ids)))

    def _finish(self, row: Row, *, joined: bool) -> None:
        ticket = row.ticket
        self._deliver(row, row.tail())
        done = self._done_event(row)
        ticket.job.done = done
        if joined:
            self.batcher._emit(None, RowLeft(
                request_id=ticket.request_id, step=self.steps, reason=done.finish_reason,
                tokens=len(row.token_ids), cancel_step=ticket.job.cancel_step))
        self.batcher._emit(ticket, done)
        self.batcher._finished(ticket)

    def _fail(self, ticket: Ticket, exc: BaseException, *, joined: bool) -> None:
        if ticket.job.finished:
            return
        ticket.job.error = exc
        if joined:
            self.batcher._emit(None, RowLeft(request_id=ticket.request_id, step=self.steps,
                                             reason="error", tokens=0))
        self.batcher._emit(ticket, error_event(ticket.request_id, exc))
        self.batcher._finished(ticket)

    def _done_event(self, row: Row) -> GenerationDone:
        ticket, lm, adapter = row.ticket, self.lm, row.ticket.adapter
        return GenerationDone(
            request_id=ticket.request_id,
            text="".join(row.pieces),
            finish_reason=row.finish_reason or "length",  # type: ignore[arg-type]
            stop=row.stop,
            provenance=Provenance(
                model=ticket.model_name, model_commit=ticket.model_commit,
                adapter=adapter.name if adapter else None,
                adapter_commit=adapter.commit if adapter else None,
                params=ticket.params.as_dict(), seed=ticket.seed, dtype=lm.dtype,
                device=lm.device, quantize=lm.options.quantize,
            ),
            timings=Timings(prefill_s=row.prefill_s, decode_s=row.decode_s,
                            prompt_tokens=row.n_prompt, completion_tokens=len(row.token_ids)),
        )
