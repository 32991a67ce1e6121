"""The TUI's one doorway to the store and the engine.

Every method blocks and is meant to run inside a thread worker; none touches the UI. The store,
the engine and the conversations database are created on first use, so importing this module (and
painting the first frame) never pays for pygit2 or torch.
"""

from __future__ import annotations

import gc
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from hyprstream_tui.errors import HyprError, InvalidInput
from hyprstream_tui.settings import Paths
from hyprstream_tui.tui.targets import ChatTargets

if TYPE_CHECKING:  # the engine's types only: this process never imports torch
    from hyprstream_tui.engine.events import EventCallback, GenerationDone
    from hyprstream_tui.engine.jobs import ChatEngine
    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.defaults import TrainDefaults
    from hyprstream_tui.engine.train.job import TrainEvent, TrainFinished, TrainStatus
    from hyprstream_tui.store.hub import DownloadProgress
    from hyprstream_tui.store.store import Store
    from hyprstream_tui.store.types import AdapterInfo, CommitInfo, ModelInfo, ModelSummary, Progress
    from hyprstream_tui.tui.conversations import ConversationStore
    from hyprstream_tui.tui.engine_link import RemoteEngine


class Backend:
    def __init__(self, *, home: str | Path | None = None, remote: str | None = None, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env(home)
        self.remote = remote
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._conversations: ConversationStore | None = None
        self._engine: ChatEngine | None = None
        self._heavy_lock = threading.Lock()
        self._engine_lock = threading.Lock()
        self._heavy_done = False
        self._running: dict[threading.Event, str] = {}  # cancel token -> what it stops

    # ---- lazily created services ---------------------------------------------------------------
    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                from hyprstream_tui.store import Store

                self._store = Store(self.paths)
            return self._store

    @property
    def conversations(self) -> ConversationStore:
        with self._lock:
            if self._conversations is None:
                from hyprstream_tui.tui.conversations import ConversationStore

                self._conversations = ConversationStore(self.paths.conversations_db)
            return self._conversations

    def heavy(self) -> None:
        """Import torch, transformers and peft once, before any thread uses them: their lazy modules
        are not safe to import from two threads at once ("cannot import name ...")."""
        with self._heavy_lock:
            if not self._heavy_done:
                from hyprstream_tui.tui.engine_link import preload

                preload()
                # torch, transformers and peft leave about a million objects that live as long as
                # the app: out of the collector's sight, a full collection no longer stops the
                # event loop for half a second (measured 465 ms with a chat and a training running).
                gc.freeze()
                self._heavy_done = True

    @property
    def engine(self) -> ChatEngine:
        """Created on first use; starting the engine's process can take seconds (the forkserver
        imports torch first), so it has a lock of its own and the store stays usable meanwhile."""
        store = self.store
        with self._engine_lock:
            if self._engine is None:
                from hyprstream_tui.tui.engine_link import make_engine

                engine = make_engine(store, remote=self.remote)
                with self._lock:
                    self._engine = engine
            return self._engine

    def _remote_engine(self) -> RemoteEngine:
        """The engine with --remote: a server's, which also lists what it serves."""
        from hyprstream_tui.tui.engine_link import RemoteEngine

        engine = self.engine
        if not isinstance(engine, RemoteEngine):
            raise TypeError(f"With --remote the engine is a RemoteEngine, not a {type(engine).__name__}.")
        return engine

    def warm_up(self) -> None:
        """Import the heavy libraries in the background once the first frame is on screen, and start
        the process training jobs fork from."""
        from hyprstream_tui.engine.forkserver import warm

        self.store  # noqa: B018 - pygit2
        warm()
        if not self.remote:
            self.engine  # noqa: B018 - the engine's process, forked once torch is loaded there
        # What the app keeps for its lifetime (Textual, pygit2): out of the collector's sight.
        gc.freeze()

    # ---- jobs that must stop when the app does ---------------------------------------------------
    @contextmanager
    def _job(self, cancel: threading.Event, what: str) -> Iterator[None]:
        with self._lock:
            self._running[cancel] = what
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(cancel, None)

    def running_jobs(self) -> list[str]:
        with self._lock:
            return sorted(self._running.values())

    def stop_all(self) -> None:
        """Ask every running generation and training job to stop (training commits its step first)."""
        with self._lock:
            tokens = list(self._running)
        for cancel in tokens:
            cancel.set()

    def close(self) -> None:
        self.stop_all()
        with self._lock:
            engine, self._engine = self._engine, None
            conversations, self._conversations = self._conversations, None
        if engine is not None:
            engine.close()
        if conversations is not None:
            conversations.close()

    # ---- models --------------------------------------------------------------------------------
    def list_models(self) -> list[ModelSummary]:
        return self.store.list_models()

    def model_info(self, name: str) -> ModelInfo:
        return self.store.model_info(name)

    def import_model(self, src: str, *, name: str | None,
                     progress: Callable[[Progress], None] | None = None) -> ModelSummary:
        from hyprstream_tui.engine.gguf import import_in_child, is_gguf

        path = Path(src).expanduser()
        if is_gguf(path):
            return import_in_child(self.paths, path, name=name or None, progress=progress)
        if not path.is_dir():
            raise InvalidInput(f"{src!r} is neither a model folder (config.json + *.safetensors) nor a .gguf file: "
                               "give one of those.")
        return self.store.import_model(path, name=name or None, progress=progress)

    def pull_model(self, repo_id: str, *, name: str | None, revision: str,
                   progress: Callable[[DownloadProgress], None], cancel: threading.Event) -> ModelSummary:
        return self.store.pull_model(repo_id, name=name or None, revision=revision or "main", progress=progress,
                                     cancel=cancel)

    def remove_model(self, name: str) -> None:
        if self._engine is not None and hasattr(self._engine, "unload"):
            self._engine.unload(name)
        self.store.remove_model(name)

    def build_demo(self) -> ModelSummary:
        """Build the tiny demo model (no network) and import it into the store."""
        from hyprstream_tui.engine.tiny import DEMO_NAME, build_demo_model

        self.heavy()
        tmp = self.paths.cache / f"demo-{uuid.uuid4().hex[:8]}"
        try:
            build_demo_model(tmp)
            return self.store.import_model(tmp, name=DEMO_NAME)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- chat ----------------------------------------------------------------------------------
    def chat(self, specs: Sequence[str], messages: Sequence[Mapping[str, str]], params: SamplingParams, *,
             request_ids: Sequence[str], on_event: EventCallback, cancel: threading.Event) -> list[GenerationDone]:
        """Answer `messages` once per spec (compare mode: two), streaming events; returns GenerationDone each."""
        from hyprstream_tui.tui.engine_link import run_chats

        light = self._light_engine(specs)
        engine = light if light is not None else self.engine
        try:
            with self._job(cancel, "a chat reply"):  # the work runs in the engine's process (or server)
                return run_chats(engine, specs, messages, params, request_ids=request_ids, on_event=on_event,
                                 cancel=cancel)
        finally:
            if light is not None:
                light.close()

    def _light_engine(self, specs: Sequence[str]) -> ChatEngine | None:
        """While the engine's process is still starting (its forkserver imports torch: some 4 s
        after the app opens), a reply it would give through the fused step comes from the model's
        step image in this process instead, without torch (`engine.light`: the same reply, events
        and provenance). None otherwise: one model, no --remote, an image the engine wrote."""
        if self.remote or len(specs) != 1 or self._engine is not None:
            return None
        from hyprstream_tui.engine.light import engine_for
        from hyprstream_tui.engine.loader import LoadOptions

        light = engine_for(specs[0], home=self.paths.home, options=LoadOptions(), threads=None)  # the child's options
        if light is None or self._engine is not None:  # it came up meanwhile: the warm engine answers
            if light is not None:
                light.close()
            return None
        return light

    def chat_targets(self, model: str | None) -> ChatTargets:
        """What can answer, `model` chosen when it is one of them (else the first model).
        With --remote, the server's /v1/models list; otherwise the local store."""
        if self.remote:
            ids = self._remote_engine().model_ids()
            models = sorted({i.partition(":")[0] for i in ids})
            model = model if model in models else (models[0] if models else None)
            adapters = sorted(i.partition(":")[2] for i in ids if model and i.startswith(model + ":"))
            return ChatTargets(models=tuple(models), model=model, adapters=tuple(adapters), untrained=frozenset(),
                               window=0)
        models = [m.name for m in self.list_models()]
        model = model if model in models else (models[0] if models else None)
        adapters = []
        untrained: set[str] = set()
        if model:
            for a in self.list_adapters(model):
                adapters.append(a.name)
                if not any(c.kind in ("checkpoint", "rollback") for c in self.log(model, a.uuid)):
                    untrained.add(a.name)
        return ChatTargets(models=tuple(models), model=model, adapters=tuple(adapters), untrained=frozenset(untrained),
                           window=self.context_window(model) if model else 0)

    @staticmethod
    def reply_meta(done: GenerationDone, *, side: str = "a") -> dict[str, Any]:
        from hyprstream_tui.tui.engine_link import reply_meta

        return reply_meta(done, side=side)

    def context_window(self, model: str) -> int:
        """The model's context window from its config (before it is loaded)."""
        import json

        try:
            config = json.loads(self.store.read_file(model, "main", "config.json"))
        except (ValueError, HyprError):
            return 0
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        return int(text.get("max_position_embeddings") or 0)

    def export_conversation(self, conversation_id: int, kind: str) -> Path:
        from hyprstream_tui.store.atomic import write_text

        store = self.conversations
        conv = store.get(conversation_id)
        text = store.export_markdown(conversation_id) if kind == "markdown" else store.export_jsonl(conversation_id)
        slug = "".join(c if c.isalnum() else "-" for c in conv.title.lower())[:40].strip("-") or "chat"
        path = self.paths.home / "exports" / f"{conversation_id}-{slug}.{'md' if kind == 'markdown' else 'jsonl'}"
        write_text(path, text)
        return path

    # ---- adapters and history ------------------------------------------------------------------
    def list_adapters(self, model: str) -> list[AdapterInfo]:
        return self.store.list_adapters(model)

    def create_adapter(self, model: str, name: str, *, rank: int, alpha: float) -> AdapterInfo:
        return self.store.create_adapter(model, name, rank=rank, alpha=alpha)

    def log(self, model: str, adapter: str, limit: int | None = None) -> list[CommitInfo]:
        return self.store.log(model, adapter, limit)

    def tag(self, model: str, adapter: str, label: str, commit: str) -> str:
        return self.store.tag(model, adapter, label, commit=commit)

    def rollback(self, model: str, adapter: str, target: str) -> CommitInfo:
        return self.store.rollback(model, adapter, target)

    def is_training(self, model: str, adapter_uuid: str) -> bool:
        from hyprstream_tui.store.locks import is_locked

        return is_locked(self.store.train_lock_path(model, adapter_uuid))

    def read_text(self, model: str, commit: str, path: str) -> str | None:
        from hyprstream_tui.errors import NotFound

        try:
            return self.store.read_file(model, commit, path).decode("utf-8", "replace")
        except NotFound:
            return None

    def read_bytes(self, model: str, commit: str, path: str) -> bytes | None:
        from hyprstream_tui.errors import NotFound

        try:
            return self.store.read_file(model, commit, path)
        except NotFound:
            return None

    def samples(self, model: str, commit: str) -> list[dict[str, Any]]:
        from hyprstream_tui.engine.train.samples import read_rows

        return read_rows(self.store, model, commit)

    def add_samples(self, model: str, adapter: str, rows: Sequence[dict[str, Any]]) -> int:
        from hyprstream_tui.engine.train.samples import add_samples

        _commit, total = add_samples(self.store, model, adapter, rows)
        return total

    def train_defaults(self, model: str, adapter: str) -> TrainDefaults:
        """What a new run of `adapter` gets for the values left out (engine/train/defaults.py)."""
        from hyprstream_tui.engine.train.defaults import defaults_for

        return defaults_for(self.store, model, adapter)

    def train(self, model: str, adapter: str, config: TrainConfig, *, on_event: Callable[[TrainEvent], None],
              cancel: threading.Event, name: str | None = None) -> TrainFinished:
        """Run a training job to its end (or until `cancel`); returns TrainFinished.

        The job runs in a child process (`engine.train.process`): the UI's interpreter stays free
        for the event loop, and this process never loads the model a second time."""
        from hyprstream_tui.engine.train.process import run_training

        with self._job(cancel, f"training of {name or adapter} on {model}"):
            return run_training(self.paths, model, adapter, config, on_event=on_event, cancel=cancel)

    def train_status(self, model: str, adapter: str) -> TrainStatus:
        from hyprstream_tui.engine.train.job import train_status

        return train_status(self.store, model, adapter)

    def request_stop(self, model: str, adapter: str) -> None:
        from hyprstream_tui.engine.train.job import request_stop

        request_stop(self.store, model, adapter)

    def samples_from_file(self, path: str) -> list[dict[str, Any]]:
        from hyprstream_tui.engine.train.samples import rows_from_file

        return rows_from_file(Path(path).expanduser())
