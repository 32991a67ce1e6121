"""The one job type of every generation, wherever it runs, and what all of them share.

A `Job` is returned by `Engine.generate/chat` (a worker thread), `Batcher.submit` (a batch row),
`ChildEngine.chat` (an engine in a child process) and `RemoteEngine.chat` (a server): cancel it,
wait for it, or take its result (which raises its error). `ChatEngine` is what the TUI needs of
any of them.

Also here, once: the request id, the seed draw, the mapping from an exception to the
`GenerationError` event, and `Workers`, the threads an engine runs its requests on.

Never imports torch.
"""

from __future__ import annotations

import os
import random
import threading
from collections import deque
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence, TypeVar

from hyprstream_tui.engine.events import Event, EventCallback, GenerationDone, GenerationError
from hyprstream_tui.errors import HyprError

if TYPE_CHECKING:
    from hyprstream_tui.engine.params import SamplingParams

E = TypeVar("E")


class Job:
    """A running generation: cancel it, wait for it, or take its result.

    `on_cancel` runs once when the job is cancelled (an engine in another process passes the
    cancel on). `steps`, when set, counts the decode steps of the batch the job is in, so a
    cancelled job records at which step it was cancelled (`cancel_step`).
    """

    def __init__(self, request_id: str, *, on_cancel: Callable[[], None] | None = None) -> None:
        self.request_id = request_id
        self.cancel_token = threading.Event()
        self.cancel_step: int | None = None
        self.steps: Callable[[], int] | None = None
        self.done: GenerationDone | None = None
        self.error: BaseException | None = None
        self.prompt_tokens = 0
        self.thread: threading.Thread | None = None
        self._on_cancel = on_cancel
        self._finished = threading.Event()

    def cancel(self) -> None:
        if self.cancel_token.is_set() or self.finished:
            return
        if self.steps is not None:
            self.cancel_step = self.steps()
        self.cancel_token.set()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self.cancel_token.is_set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def finish(self) -> bool:
        """Mark the job finished (set `done` or `error` first) and wake its waiters.

        Returns False when it had finished already: the first outcome stands."""
        if self._finished.is_set():
            return False
        self._finished.set()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None) -> GenerationDone:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"Request {self.request_id} is still running.")
        if self.error is not None:
            raise self.error
        assert self.done is not None
        return self.done


class Forwarded:
    """A job whose events come from another process (`child.ChildEngine`, the keep-alive
    client): the job, the caller's callback, and that callback's failure, if any."""

    def __init__(self, job: Job, on_event: EventCallback) -> None:
        self.job = job
        self.on_event = on_event
        self.callback_error: BaseException | None = None

    def deliver(self, event: Event, rebuild: Callable[[GenerationError], BaseException]) -> None:
        """Hand `event` to the callback (one that fails cancels the job, as in Engine, and its
        error is the job's); GenerationDone or GenerationError (as `rebuild` makes it an
        exception again) finishes the job."""
        job = self.job
        try:
            self.on_event(event)
        except Exception as exc:  # noqa: BLE001 - kept on the job
            self.callback_error = exc
            job.cancel()
        if isinstance(event, GenerationDone):
            job.done = event
            job.error = self.callback_error
            job.finish()
        elif isinstance(event, GenerationError):
            job.error = self.callback_error or rebuild(event)
            job.finish()

    def fail(self, message: str) -> None:
        """The other process is gone: the job ends with `message`."""
        self.job.error = HyprError(message)
        self.job.finish()


class ChatEngine(Protocol):
    """What a front end needs of an engine, local or not: answer a conversation with a Job."""

    def chat(
        self,
        spec: str,
        messages: Sequence[Mapping[str, str]],
        params: "SamplingParams",
        *,
        on_event: EventCallback | None = None,
        request_id: str | None = None,
    ) -> Job: ...

    def close(self) -> None: ...


class Workers:
    """Threads that run one piece of work after another and wait for the next: an engine's
    requests. OpenMP keeps a team of threads per calling thread, so a thread made for each request
    paid for a new team on its first step (8-10 ms of a 13-18 ms step on 2 cores, every warm
    reply). A thread idle for `idle_s` ends; daemon threads, as request threads were."""

    def __init__(self, name: str, idle_s: float = 600.0) -> None:
        self.name, self.idle_s = name, idle_s
        self._cond = threading.Condition()
        self._pending: deque[Callable[[], object]] = deque()
        self._idle = 0

    def start(self, work: Callable[[], object]) -> None:
        """Run `work` on an idle thread, or on a new one when none is free."""
        with self._cond:
            self._pending.append(work)
            if self._idle >= len(self._pending):
                self._cond.notify()
                return
        threading.Thread(target=self._serve, name=self.name, daemon=True).start()

    def call(self, work: Callable[[], E]) -> E:
        """Run `work` on one of these threads and return what it returns (raise what it raises)."""
        out: list[E] = []
        error: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                out.append(work())
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                error.append(exc)
            finally:
                done.set()

        self.start(run)
        done.wait()
        if error:
            raise error[0]
        return out[0]

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._idle += 1
                    woken = self._cond.wait(self.idle_s)
                    self._idle -= 1
                    if not woken and not self._pending:
                        return
                work = self._pending.popleft()
            try:
                work()
            except Exception:  # noqa: BLE001 - work reports its own errors; the thread stays
                pass


def new_request_id() -> str:
    return os.urandom(6).hex()  # as uuid4().hex[:12], without importing uuid (and platform)


def draw_seed(seed: int | None) -> int:
    """`seed`, or a fresh one from the OS when none was asked for (it goes into the provenance)."""
    return seed if seed is not None else random.SystemRandom().randrange(2**63)


def error_event(request_id: str, exc: BaseException) -> GenerationError:
    """The event that reports `exc`: a HyprError's own one line, anything else as a bug."""
    if isinstance(exc, HyprError):
        return GenerationError(request_id=request_id, message=exc.message,
                               kind=type(exc).__name__, exit_code=exc.exit_code)
    return GenerationError(request_id=request_id, kind="bug",
                           message=f"Internal error: {type(exc).__name__}: {exc}")



def emit_quietly(emit: Callable[[E], None], event: E) -> None:
    """Deliver an event where a failing callback must not stop the sender (a final error event,
    a batch's other rows)."""
    try:
        emit(event)
    except Exception:  # noqa: BLE001 - the consumer's bug is its own
        pass


def ignore(event: object) -> None:
    pass


__all__ = ["ChatEngine", "Forwarded", "Job", "Workers", "draw_seed", "emit_quietly", "error_event", "new_request_id"]
