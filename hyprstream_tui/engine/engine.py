"""`Engine`: the one facade the CLI, TUI and server use for generation.

It resolves `MODEL[:ADAPTER[@REV]]`, keeps the most recently used models loaded (LRU), runs each
request in a worker thread and reports through events (see `events.py`). Each loaded model has a
lock: generations on one model take turns (the adapter in use is part of the model's state),
generations on different models run side by side.

Importing this module does not import torch; the first request does.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from hyprstream_tui.engine.events import (
    ContextTrimmed,
    Event,
    EventCallback,
    GenerationDone,
    GenerationError,
    ModelLoaded,
    TokenDelta,
)
from hyprstream_tui.engine.jobs import (
    Job,
    Workers,
    draw_seed,
    emit_quietly,
    error_event,
    ignore,
    new_request_id,
)
from hyprstream_tui.engine.loader import LoadedModel, LoadOptions, ModelSource
from hyprstream_tui.engine.params import SamplingParams, check_budget, check_prompt
from hyprstream_tui.engine.prefix import PrefixCache
from hyprstream_tui.engine.sources import ModelSpec, parse_spec, resolve_source
from hyprstream_tui.errors import HyprError, InvalidInput

if TYPE_CHECKING:
    from hyprstream_tui.engine.sequence import SequenceState
    from hyprstream_tui.store import Store


ModelKey = tuple[str, str | None, LoadOptions]  # a loaded model: (folder, commit, options)


@dataclass(frozen=True, kw_only=True)
class Request:
    """One generation: a raw prompt, or chat messages rendered with the chat template."""

    spec: ModelSpec
    params: SamplingParams
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    request_id: str = ""
    # None: the engine's own. A keep-alive engine (engine/keepalive.py) serves commands that each
    # bring their own load options and thread count; loaded models are kept per options.
    options: LoadOptions | None = None
    threads: int | None = None


_thread_count = threading.local()  # .set: this worker thread's count was set by a request


class Engine:
    """Loads models by name and generates in worker threads. Thread-safe."""

    def __init__(
        self,
        *,
        store: "Store | None" = None,
        max_models: int = 2,
        options: LoadOptions = LoadOptions(),
        threads: int | None = None,
        drafts: bool = False,
    ) -> None:
        self.store = store
        # fp32 models get an int8 draft (engine/speculate.py): in `warm`, or after the reply of a
        # request that loaded them. The keep-alive engine only: a command pays no draft load
        self.drafts = drafts
        self.max_models = max(1, max_models)
        self.options = options
        self.threads = threads
        self._models: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._models_lock = threading.Lock()
        self._loading: dict[ModelKey, threading.Lock] = {}
        self._jobs: set[Job] = set()
        self._jobs_lock = threading.Lock()
        # KV caches of earlier requests, their prompt prefixes reused (engine/prefix.py)
        self.prefix = PrefixCache()
        self.workers = Workers("hyprstream-gen")  # kept threads: each keeps its OpenMP team

    # ---- models --------------------------------------------------------------------------
    def resolve(self, spec: str | ModelSpec) -> ModelSource:
        """Folders and commits for `spec` (NotFound for unknown models and adapters)."""
        return resolve_source(spec, self.store)

    def load(self, spec: str | ModelSpec, options: LoadOptions | None = None) -> LoadedModel:
        """The loaded base model for `spec`, loading it if needed (blocks)."""
        model, _ = self._get_model(self.resolve(spec), options or self.options)
        return model

    def loaded(self) -> list[LoadedModel]:
        with self._models_lock:
            return list(self._models.values())

    def unload(self, name: str | None = None) -> None:
        """Forget loaded models (all, or those named `name`); running requests keep theirs."""
        with self._models_lock:
            for key in [k for k, m in self._models.items() if name in (None, m.source.name)]:
                self.prefix.forget(self._models.pop(key))

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel running requests, wait for them (up to `timeout` s each), unload every model."""
        with self._jobs_lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        for job in jobs:
            job.wait(timeout)
        self.unload()

    def _get_model(self, source: ModelSource, options: LoadOptions) -> tuple[LoadedModel, bool]:
        key = (str(source.path), source.commit, options)
        with self._models_lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key], False
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one thread loads, the others wait for it
            with self._models_lock:
                if key in self._models:
                    return self._models[key], False
            base = dataclasses.replace(source, adapter=None)
            try:
                model = self._load(base, options)
            except BaseException:
                with self._models_lock:
                    self._loading.pop(key, None)
                raise
            with self._models_lock:
                self._models[key] = model
                self._loading.pop(key, None)
                while len(self._models) > self.max_models:
                    self.prefix.forget(self._models.popitem(last=False)[1])
            return model, True

    def _load(self, source: ModelSource, options: LoadOptions) -> LoadedModel:
        """Read a model (the base of `source`) into memory: torch's model classes here."""
        from hyprstream_tui.engine.loader import load_model

        return load_model(source, options)

    # ---- generation ------------------------------------------------------------------------
    def generate(
        self,
        spec: str | ModelSpec,
        prompt: str,
        params: SamplingParams = SamplingParams(),
        *,
        on_event: EventCallback | None = None,
        request_id: str | None = None,
    ) -> Job:
        """Continue `prompt` (raw text, no chat template) in a worker thread."""
        request = Request(
            spec=_spec(spec), params=params, prompt=check_prompt(prompt),
            request_id=request_id or new_request_id(),
        )
        return self.submit(request, on_event)

    def chat(
        self,
        spec: str | ModelSpec,
        messages: Sequence[Mapping[str, str]],
        params: SamplingParams = SamplingParams(),
        *,
        on_event: EventCallback | None = None,
        request_id: str | None = None,
    ) -> Job:
        """Answer the conversation `messages` (the last one from the user) in a worker thread."""
        from hyprstream_tui.engine.chat import check_messages

        request = Request(
            spec=_spec(spec), params=params, messages=tuple(check_messages(messages)),
            request_id=request_id or new_request_id(),
        )
        return self.submit(request, on_event)

    def submit(self, request: Request, on_event: EventCallback | None = None) -> Job:
        job = Job(request.request_id)
        with self._jobs_lock:
            self._jobs.add(job)
        self.workers.start(lambda: self._run(request, job, on_event or ignore))
        return job

    def stream(
        self, spec: str | ModelSpec, *, prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        params: SamplingParams = SamplingParams(),
    ) -> Iterator[Event]:
        """The events of one request as an iterator (for the CLI and the HTTP server).

        Closing the iterator early (a client that went away) cancels the request.
        """
        events: queue.Queue[Event] = queue.Queue()
        if messages is not None:
            job = self.chat(spec, messages, params, on_event=events.put)
        else:
            job = self.generate(spec, prompt or "", params, on_event=events.put)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, (GenerationDone, GenerationError)):
                    return
        finally:
            job.cancel()

    def _run(self, request: Request, job: Job, emit: EventCallback) -> None:
        later: list[Callable[[], object]] = []
        try:
            self._use_threads(request.threads if request.threads is not None else self.threads)
            job.done = self._generate(request, job.cancel_token, emit, later)
            emit(job.done)
        except Exception as exc:  # a HyprError, a bug or a failing callback: kept on the job
            job.error = exc
            emit_quietly(emit, error_event(request.request_id, exc))
        finally:
            for work in later:  # after the reply is out, before the job ends: `close` waits for it
                try:
                    work()
                except Exception:  # noqa: BLE001 - best effort (a draft): the reply stands
                    pass
            with self._jobs_lock:
                self._jobs.discard(job)
            job.finish()

    def _use_threads(self, threads: int | None) -> None:
        """Set this worker thread's CPU thread count for the request (None: the default). OpenMP's
        count is per calling thread, and a worker thread serves request after request: one that
        an earlier request set is set back to the default."""
        if threads is not None or getattr(_thread_count, "set", False):
            from hyprstream_tui.engine.loader import set_threads

            set_threads(threads)
            _thread_count.set = threads is not None

    def _generate(
        self, request: Request, cancel: threading.Event, emit: EventCallback,
        later: list[Callable[[], object]] | None = None,
    ) -> GenerationDone:
        source = self.resolve(request.spec)
        if source.adapter is not None:
            from hyprstream_tui.engine.adapters import check_adapter

            check_adapter(request.options or self.options, source.adapter)
        started = time.perf_counter()
        lm, fresh = self._get_model(source, request.options or self.options)
        # lm.load_s: a LightEngine reads its model before the request (engine/light.py)
        load_s = max(time.perf_counter() - started, lm.load_s) if fresh else 0.0
        if fresh:
            emit(ModelLoaded(request_id=request.request_id, model=source.name,
                             model_commit=source.commit, seconds=load_s, dtype=lm.dtype,
                             device=lm.device, quantize=lm.options.quantize))
        with lm.lock:
            lm.use_adapter(source.adapter)
            prompt_ids, dropped = self._prompt_ids(lm, request, emit)
            done = self._decode(lm, source, request, prompt_ids, dropped, load_s, cancel, emit)
            after, lm.after_first_reply = lm.after_first_reply, None
        if after is not None:
            after()
        if fresh and self.drafts and later is not None:  # a model loaded by a request: its draft after the reply
            later.append(lambda: self._attach_draft(lm))
        return done

    def _prompt_ids(
        self, lm: LoadedModel, request: Request, emit: EventCallback
    ) -> tuple[list[int], int]:
        max_tokens = request.params.max_tokens
        if request.messages is None:
            assert request.prompt is not None  # a Request holds a prompt or messages
            ids = list(lm.tokenizer.encode(request.prompt))
            check_budget(prompt_tokens=len(ids), max_tokens=max_tokens, window=lm.window)
            return ids, 0
        from hyprstream_tui.engine.chat import fit_conversation

        check_budget(prompt_tokens=1, max_tokens=max_tokens, window=lm.window)
        fitted = fit_conversation(lm.tokenizer, request.messages, budget=lm.window - max_tokens)
        if fitted.dropped_messages:
            emit(ContextTrimmed(request_id=request.request_id,
                                dropped_messages=fitted.dropped_messages,
                                dropped_tokens=fitted.dropped_tokens,
                                prompt_tokens=len(fitted.ids), window=lm.window))
        return fitted.ids, fitted.dropped_messages

    def _decode(
        self, lm: LoadedModel, source: ModelSource, request: Request, prompt_ids: list[int],
        dropped: int, load_s: float, cancel: threading.Event, emit: EventCallback,
    ) -> GenerationDone:
        from hyprstream_tui.engine.sequence import SequenceState, provenance, seeded

        params = request.params
        seed = draw_seed(params.seed)
        seq = SequenceState(prompt_ids, params, eos_ids=lm.eos_ids, generator=seeded(seed),
                            tokenizer=lm.tokenizer)
        for text in self._texts(lm, seq, cancel):
            if text:
                emit(TokenDelta(request_id=request.request_id, text=text,
                                tokens=len(seq.token_ids)))
        return seq.done(request.request_id, provenance(lm, source, params, seed), load_s=load_s,
                        dropped_messages=dropped)

    def warm(self, spec: str | ModelSpec, options: LoadOptions, ids: Sequence[int],
             threads: int | None = None) -> None:
        """Load `spec` and run the prompt `ids` once, so that its KV cache is kept for the next
        request that starts with them (the conversation of a command answered elsewhere). What
        that request would otherwise do for the first time is done here too: the chat template
        compiled (jinja2 imported) and the sampler's generator made (numpy.random imported),
        about 60 ms of a warm reply. It runs on a request thread (`workers`), whose OpenMP team the
        next request then finds made; `threads`: its CPU threads (None: the engine's)."""
        self.workers.call(lambda: self._warm(spec, options, ids, threads))

    def _warm(self, spec: str | ModelSpec, options: LoadOptions, ids: Sequence[int], threads: int | None) -> None:
        from hyprstream_tui.engine.chat import render
        from hyprstream_tui.engine.sequence import SequenceState, seeded

        self._use_threads(threads if threads is not None else self.threads)
        lm = self.load(spec, options)
        if self.drafts and lm.draft is None:
            self._attach_draft(lm)
        with lm.lock:
            lm.use_adapter(None)
            # two tokens: the second runs a decode step, whose first run in a process (the exact
            # step's tables, torch's kernels through it) would otherwise fall on a request (11 ms)
            seq = SequenceState(list(ids), SamplingParams(temperature=0, max_tokens=2), eos_ids=frozenset(),
                                generator=seeded(0))
            for _ in self._texts(lm, seq, threading.Event()):
                pass
            try:
                render(lm.tokenizer, [{"role": "user", "content": "warm-up"}])
            except InvalidInput:  # a template that refuses this: its first request says so
                pass

    def _attach_draft(self, lm: LoadedModel) -> None:
        """Give `lm` its int8 draft where speculative decoding applies: an fp32 model of the
        engine's own classes on the CPU, through the fused step. The draft's weights come from
        the home's cache of quantized weights (made there on the first use)."""
        from hyprstream_tui.engine import speculate
        from hyprstream_tui.engine.loader import load_model

        if lm.draft is not None or not (speculate.enabled() and lm.dtype == "float32" and lm.device == "cpu" and lm.options.tuned
                and lm.options.quantize is None and getattr(lm.model, "native", False)):
            return
        try:
            draft = load_model(lm.source, dataclasses.replace(lm.options, quantize="int8"), images=False)
        except (HyprError, OSError):  # no draft: the model's own steps run, as before
            return
        lm.draft = draft.model

    def _texts(self, lm: LoadedModel, seq: SequenceState, cancel: threading.Event) -> Iterator[str]:
        """`seq` decoded on `lm` (`generate.decode`'s texts), over the KV cache of an earlier
        request that began with the same tokens where one is kept."""
        from hyprstream_tui.engine.generate import decode, new_cache

        prompt_ids = seq.prompt_ids
        taken = self.prefix.take(lm, prompt_ids)  # the prompt's start computed by an earlier request
        cache = taken.cache if taken.cache is not None else new_cache(lm.model)
        yield from decode(lm.model, seq, cancel=cancel, cache=cache, tuned=lm.options.tuned, draft=lm.draft)
        # Only after a request that ended without an error (a cache left mid-forward is not whole),
        # and only for a model still loaded: an unloaded model's memory must go.
        if self._holds(lm):
            self.prefix.keep(lm, seq.seen[: seq.n_prompt + len(seq.token_ids)].tolist(), cache)

    def _holds(self, lm: LoadedModel) -> bool:
        with self._models_lock:
            return any(m is lm for m in self._models.values())


def _spec(spec: str | ModelSpec) -> ModelSpec:
    return parse_spec(spec) if isinstance(spec, str) else spec


__all__ = ["Engine", "Request"]
