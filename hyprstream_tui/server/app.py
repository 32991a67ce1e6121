"""The OpenAI-compatible HTTP API on the engine: `create_app(...)` returns a FastAPI app.

Routes: GET /health, GET /v1/models (models and `model:adapter` entries), GET /v1/models/{id},
POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as SSE), and the
OpenAPI schema at /openapi.json. Generation goes through a `Batcher` (continuous batching).

Nothing here loads from the hub, trains, exports, or takes a path: models come from the local
store by name, with the engine's safe loading (safetensors only, no remote code).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse

from hyprstream_tui.engine.batching import Batcher
from hyprstream_tui.errors import InvalidInput, NotFound
from hyprstream_tui.server import errors
from hyprstream_tui.server.generation import (
    Chunks, Run, chat_messages, completion_prompt, finish_reason, sampling_params, start,
    stream_chunks, usage, wait_done,
)
from hyprstream_tui.server.schemas import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
    CompletionChoice, CompletionRequest, ErrorResponse, Health, ModelCard, ModelList,
)
from hyprstream_tui.server.security import DEFAULT_MAX_BODY, Guard, allowed_hosts_for

if TYPE_CHECKING:
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.store import Store

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid parameters, or context_length_exceeded"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    503: {"model": ErrorResponse, "description": "Queue full: retry after Retry-After seconds"},
}
# One server-sent event (OpenAPI 3.0/3.1 put the per-event schema under `schema`): each `data` is
# a JSON chunk in OpenAI's shape, the last one the literal `[DONE]`.
SSE_EVENT = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                   "id": {"type": "string"}, "retry": {"type": "integer"}},
}
SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
             "description": "JSON, or with stream: true a text/event-stream of chunks"}}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(
    source: Store | Engine | Batcher | None = None,
    *,
    api_key: str | None = None,
    max_queue: int = 32,
    max_batch: int = 8,
    bind: str = "127.0.0.1",
    allowed_hosts: list[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """An app serving `source`: a Store, an Engine, a Batcher, or None (the store of $HYPRSTREAM_HOME).

    Host names answered are the loopback names and `bind`, plus `allowed_hosts`.
    """
    batcher, store = _batcher(source, max_batch=max_batch, max_queue=max_queue)
    if api_key is not None and (not api_key.isascii() or not api_key.isprintable() or not api_key.strip()):
        raise InvalidInput("The API key must be printable ASCII text.")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        from anyio import to_thread

        await to_thread.run_sync(batcher.close)

    app = FastAPI(title="hyprstream", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API on the hyprstream engine.")
    app.state.batcher = batcher
    errors.install(app)
    _routes(app, batcher, store)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    hosts = allowed_hosts_for(bind, allowed_hosts or ())
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=hosts, max_body_bytes=max_body_bytes)
    return app


def _batcher(source: Store | Engine | Batcher | None, *, max_batch: int, max_queue: int) -> tuple[Batcher, Store]:
    """The batcher serving `source`, and the store its engine reads (given one if it had none)."""
    from hyprstream_tui.engine.engine import Engine

    if isinstance(source, Batcher):
        batcher = source
    else:
        engine = source if isinstance(source, Engine) else Engine(store=source or _default_store())
        batcher = Batcher(engine, max_batch=max_batch, max_queue=max_queue)
    store = batcher.engine.store
    if store is None:
        store = batcher.engine.store = _default_store()
    if batcher.engine.options.allow_pickle:
        raise InvalidInput("The server never loads pickle weights: start it without allow_pickle.")
    return batcher, store


def _default_store() -> Store:
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return Store(Paths.from_env())


def _version() -> str:
    from hyprstream_tui import __version__

    return __version__


def _routes(app: FastAPI, batcher: Batcher, store: Store) -> None:
    @app.get("/health", response_model=Health)
    def health() -> Health:
        loaded = [m.source.name for m in batcher.engine.loaded()]
        return Health(in_flight=batcher.in_flight, max_batch=batcher.max_batch,
                      max_queue=batcher.max_queue, loaded=loaded)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    def list_models() -> ModelList:
        return ModelList(data=_model_cards(store))

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    def get_model(model_id: str) -> ModelCard:
        for card in _model_cards(store):
            if card.id == model_id:
                return card
        raise NotFound(f"The model {model_id!r} does not exist: see GET /v1/models.")

    @app.post("/v1/completions", response_model=Completion, responses={**SSE, **ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
        params, fill = sampling_params(body)
        run = await start(batcher, body.model, prompt=completion_prompt(body), params=params,
                          fill=fill, param="prompt")
        chunks = Chunks(id=f"cmpl-{run.request_id}", created=run.created, model=body.model, chat=False)
        if body.stream:
            return _streaming(run, chunks, body)
        done = await wait_done(run, request)
        return Completion(id=chunks.id, created=run.created, model=body.model, usage=usage(done),
                          choices=[CompletionChoice(index=0, text=done.text,
                                                    finish_reason=finish_reason(done))])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**SSE, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
        params, fill = sampling_params(body)
        run = await start(batcher, body.model, messages=chat_messages(body), params=params,
                          fill=fill, param="messages")
        chunks = Chunks(id=f"chatcmpl-{run.request_id}", created=run.created, model=body.model,
                        chat=True)
        if body.stream:
            return _streaming(run, chunks, body)
        done = await wait_done(run, request)
        return ChatCompletion(
            id=chunks.id, created=run.created, model=body.model, usage=usage(done),
            choices=[ChatChoice(index=0, message=AssistantMessage(content=done.text),
                                finish_reason=finish_reason(done))])


def _streaming(run: Run, chunks: Chunks, body: CompletionRequest | ChatCompletionRequest) -> StreamingResponse:
    include = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(stream_chunks(run, chunks, include_usage=include),
                             media_type="text/event-stream", headers=SSE_HEADERS)


def _model_cards(store: Store) -> list[ModelCard]:
    """Every store model, then every adapter that has weights (trained) as `model:adapter`."""
    cards = []
    for summary in store.list_models():
        created = _created(store, summary.name)
        cards.append(ModelCard(id=summary.name, created=created))
        for adapter in store.list_adapters(summary.name):
            if _has_weights(store, summary.name, adapter.tip):
                cards.append(ModelCard(id=f"{summary.name}:{adapter.name}", created=created))
    return cards


def _has_weights(store: Store, model: str, commit: str) -> bool:
    """Whether the adapter at `commit` can load (the snapshot is cached per commit)."""
    try:
        folder = store.snapshot(model, commit, subdir="adapter")
    except NotFound:
        return False
    return any(p.suffix == ".safetensors" for p in folder.iterdir())


def _created(store: Store, name: str) -> int:
    try:
        return int(os.stat(store.model_dir(name)).st_mtime)
    except OSError:
        return 0


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The schema without FastAPI's 422 entries: validation problems are 400s in OpenAI's shape."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
