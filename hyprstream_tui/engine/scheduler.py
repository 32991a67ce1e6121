"""The scheduler thread of one (loaded model, adapter): admit, drop the cancelled, step, retire.

See `batching.py` for the picture. Each row decodes with `sequence.SequenceState`, the state the
single-stream loop (`generate.decode`) uses too, so a request's text is the same batched or alone.
The scheduler reaches its batcher only through `rows.BatchHost`.

Imports torch at module level: `Batcher` imports this lazily, when the first request arrives.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable

import torch

from hyprstream_tui.engine.events import TokenDelta
from hyprstream_tui.engine.generate import new_cache, prefill
from hyprstream_tui.engine.jobs import error_event
from hyprstream_tui.engine.rows import IDLE_LINGER_S, BatchHost, RowJoined, RowLeft, Ticket
from hyprstream_tui.engine.sequence import SequenceState, provenance, seeded
from hyprstream_tui.engine.tuned.batch_cache import BatchCache, batchable

if TYPE_CHECKING:
    from hyprstream_tui.engine.loader import AdapterSource, LoadedModel


@dataclass(eq=False)
class Row:
    """A request holding a batch row: its ticket and its decoding state."""

    ticket: Ticket
    seq: SequenceState

    @property
    def cancelled(self) -> bool:
        return self.ticket.job.cancelled


class Scheduler(threading.Thread):
    """Decodes every active row of one (model, adapter) together, one token per step."""

    def __init__(self, host: BatchHost, lm: "LoadedModel", adapter: "AdapterSource | None",
                 key: tuple[int, Hashable]) -> None:
        super().__init__(name=f"hyprstream-batch-{lm.source.name}", daemon=True)
        self.host, self.lm, self.adapter, self.key = host, lm, adapter, key
        self.waiting: deque[Ticket] = deque()  # guarded by host.condition
        self.rows: list[Row] = []
        self.kv = BatchCache()
        self.steps = 0
        self.accepting = True
        self.can_batch: bool | None = None  # known after the first prefill
        self.device = next(lm.model.parameters()).device

    def step_count(self) -> int:
        return self.steps

    def enqueue(self, ticket: Ticket) -> None:
        """Under host.condition: `ticket` waits for a row; its job counts this batch's steps."""
        ticket.job.steps = self.step_count
        self.waiting.append(ticket)

    def cancel_all(self) -> None:
        with self.host.condition:
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
        cond = self.host.condition
        with cond:
            deadline = time.monotonic() + IDLE_LINGER_S
            while not self.waiting and not self.rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.host.closing:
                    self.accepting = False
                    self.host.retire(self.key, self)
                    return None
                cond.wait(remaining)
            if self.can_batch is False:
                free = 0 if self.rows else 1
            else:
                free = self.host.max_batch - len(self.rows)
            return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]

    def _use_adapter(self) -> None:
        """Under lm.lock: the adapter is shared state of the model, switched per step."""
        self.lm.use_adapter(self.adapter)

    # ---- joining ----------------------------------------------------------------------------
    def _admit(self, ticket: Ticket) -> None:
        """Prefill `ticket` alone, take its first token, and merge its KV row into the batch."""
        lm = self.lm
        row = Row(ticket, SequenceState(ticket.prompt_ids, ticket.params, eos_ids=lm.eos_ids,
                                        generator=seeded(ticket.seed), tokenizer=lm.tokenizer))
        seq = row.seq
        if row.cancelled:
            seq.cancel()
            self._finish(row, joined=False)
            return
        try:
            started = time.perf_counter()
            cache = new_cache(lm.model)
            input_ids = torch.from_numpy(seq.seen[: seq.n_prompt]).unsqueeze(0).to(self.device)  # [1, S]
            positions = torch.arange(seq.n_prompt, device=self.device).unsqueeze(0)  # [1, S]
            with lm.lock:
                self._use_adapter()
                logits = prefill(lm.model, input_ids, positions, cache)  # [V]
            token = seq.pick(logits.float().cpu())
            seq.prefill_s = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - reported to the request, the batch goes on
            self._fail(ticket, exc, joined=False)
            return
        if self.can_batch is None:
            self.can_batch = batchable(cache)
        self._deliver(row, seq.accept(token))
        if row.cancelled:
            seq.cancel()
        if seq.finish_reason is not None:
            self._finish(row, joined=False)
            return
        self.kv.add(cache, seq.n_prompt)
        self.rows.append(row)
        self.host.deliver(ticket, RowJoined(request_id=ticket.request_id, step=self.steps,
                                            rows=len(self.rows), prompt_tokens=seq.n_prompt))

    # ---- one decode step --------------------------------------------------------------------
    def _step(self) -> None:
        """ONE forward over the last token of every row; each row samples its own next token."""
        started = time.perf_counter()
        try:
            tokens = torch.tensor([[r.seq.token_ids[-1]] for r in self.rows], device=self.device)  # [B, 1]
            positions = torch.tensor([[r.seq.position] for r in self.rows], device=self.device)  # [B, 1]
            mask = self.kv.step_mask()  # [B, T + 1]
            with self.lm.lock:
                self._use_adapter()
                out = self.lm.model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                                    cache=self.kv.cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float().cpu().numpy()  # [B, V]
        except Exception as exc:  # noqa: BLE001 - the batch state is unknown: fail its rows
            self._fail_all(exc, [])
            return
        self.steps += 1
        elapsed = time.perf_counter() - started
        keep = []
        for i, row in enumerate(self.rows):
            seq = row.seq
            seq.decode_s += elapsed
            self._deliver(row, seq.accept(seq.pick(logits[i])))
            if row.cancelled:
                seq.cancel()
            if seq.finish_reason is None:
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
                row.seq.cancel()
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
            self.host.deliver(row.ticket, TokenDelta(
                request_id=row.ticket.request_id, text=text, tokens=len(row.seq.token_ids)))

    def _finish(self, row: Row, *, joined: bool) -> None:
        ticket, seq = row.ticket, row.seq
        self._deliver(row, seq.tail())
        done = seq.done(ticket.request_id,
                        provenance(self.lm, ticket.source, ticket.params, ticket.seed))
        ticket.job.done = done
        if joined:
            self.host.deliver(None, RowLeft(
                request_id=ticket.request_id, step=self.steps, reason=done.finish_reason,
                tokens=len(seq.token_ids), cancel_step=ticket.job.cancel_step))
        self.host.deliver(ticket, done)
        self.host.release(ticket)

    def _fail(self, ticket: Ticket, exc: BaseException, *, joined: bool) -> None:
        if ticket.job.finished:
            return
        ticket.job.error = exc
        if joined:
            self.host.deliver(None, RowLeft(request_id=ticket.request_id, step=self.steps,
                                            reason="error", tokens=0))
        self.host.deliver(ticket, error_event(ticket.request_id, exc))
        self.host.release(ticket)
