"""From an HTTP request to a batched generation and back: parameters, events, SSE chunks.

`start` checks and queues the request in a worker thread (the model may have to load), with an
event callback that hops from the scheduler thread onto the event loop. Non-streaming requests
wait for the end while watching for a client disconnect; streaming ones yield OpenAI chunks. Either
way a client that goes away cancels its generation, and the batch drops it within one step.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence

from anyio import to_thread
from fastapi import Request

from hyprstream_tui.engine.batching import Batcher
from hyprstream_tui.engine.events import GenerationDone, GenerationError, TokenDelta
from hyprstream_tui.engine.jobs import Job
from hyprstream_tui.engine.rows import BatchEvent
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.errors import HyprError, InvalidInput, worded
from hyprstream_tui.server.errors import APIError, from_hypr, quoted
from hyprstream_tui.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FinishReason,
    Usage,
)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
UNBOUNDED = 2**31 - 1  # chat without max_tokens: whatever the window leaves


def sampling_params(body: CompletionRequest | ChatCompletionRequest) -> tuple[SamplingParams, bool]:
    """SamplingParams for `body`, and whether max_tokens may fill the rest of the window."""
    _refuse_unsupported(body)
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    fill = max_tokens is None and isinstance(body, ChatCompletionRequest)
    if max_tokens is None:
        max_tokens = UNBOUNDED if fill else DEFAULT_COMPLETION_TOKENS
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            max_tokens=max_tokens,
            seed=body.seed,
            stop=tuple(stop),
        )
    except InvalidInput as exc:
        raise from_hypr(exc, param=_param_of(exc.message)) from None
    return params, fill


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    checks = [
        ("presence_penalty", bool(body.presence_penalty)),
        ("frequency_penalty", bool(body.frequency_penalty)),
        ("logit_bias", bool(body.logit_bias)),
        ("logprobs", bool(body.logprobs)),
    ]
    if isinstance(body, CompletionRequest):
        checks += [("echo", bool(body.echo)), ("suffix", bool(body.suffix))]
    else:
        checks += [("top_logprobs", bool(body.top_logprobs))]
    for name, used in checks:
        if used:
            raise APIError(400, f"'{name}' is not supported by this server: leave it out.",
                           param=name, code="unsupported_parameter")


def _param_of(message: str) -> str | None:
    """The field a SamplingParams message is about: it starts with the field's name, or is
    about stop strings ("At most 16 stop strings", "Each stop string ...")."""
    first = message.split()[0] if message else ""
    if first in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed"):
        return first
    return "stop" if "stop" in message else None


def completion_prompt(body: CompletionRequest) -> str:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise APIError(400, "Send exactly one prompt per request (a string or a list of one).",
                           param="prompt", code="invalid_value")
        return body.prompt[0]
    return body.prompt


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for message in body.messages:
        content = message.content
        if not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": content})
    return out


RunEvent = TokenDelta | GenerationDone | GenerationError  # what a response is made of


class Run:
    """One queued generation as seen from the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RunEvent] = asyncio.Queue()
        self.job: Job | None = None
        self.created = int(time.time())

    def on_event(self, event: BatchEvent) -> None:
        """Called in the scheduler thread."""
        if isinstance(event, (TokenDelta, GenerationDone, GenerationError)):
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down)
                pass

    @property
    def request_id(self) -> str:
        return self.job.request_id if self.job is not None else ""

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    async def events(self) -> AsyncIterator[RunEvent]:
        """TokenDelta events, then one GenerationDone or GenerationError."""
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, (GenerationDone, GenerationError)):
                return


async def start(batcher: Batcher, model: str, *, param: str, fill: bool, params: SamplingParams,
                prompt: str | None = None,
                messages: Sequence[Mapping[str, str]] | None = None) -> Run:
    """Check and queue the request (in a thread: loading a model blocks); HTTP errors raise."""
    run = Run()
    try:
        spec = batcher.check_spec(model)
        await to_thread.run_sync(batcher.engine.resolve, spec)  # unknown or misspelt names
    except HyprError as exc:
        raise from_hypr(exc, param="model") from None

    def submit() -> Job:
        return batcher.submit(spec, prompt=prompt, messages=messages, params=params,
                              on_event=run.on_event, fill_window=fill)

    try:
        run.job = await to_thread.run_sync(submit)
    except HyprError as exc:
        raise from_hypr(exc, param=param) from None
    return run


async def wait_done(run: Run, request: Request) -> GenerationDone:
    """The finished generation; a client that disconnects first cancels it."""
    result = asyncio.ensure_future(_result(run))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result.done():
            return result.result()
        raise APIError(499, "The client closed the request.", code="client_closed")
    finally:
        run.cancel()
        for task in (result, gone):
            task.cancel()


async def _result(run: Run) -> GenerationDone:
    async for event in run.events():
        if isinstance(event, GenerationError):
            raise _event_error(event)
        if isinstance(event, GenerationDone):
            return event
    raise AssertionError("events ended without a result")  # pragma: no cover


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event_error(event: GenerationError) -> APIError:
    if event.kind == "bug":
        return APIError(500, "The server had an internal error while generating; the details "
                             "are in its log.", type="server_error")
    return APIError(400, worded(event.message, quoted), code="generation_failed")


def usage(done: GenerationDone) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)


def finish_reason(done: GenerationDone) -> FinishReason:
    return "length" if done.finish_reason == "length" else "stop"


# ---- streaming ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Chunks:
    """The bodies of one response's stream chunks, in OpenAI's completion or chat shape."""

    id: str
    created: int
    model: str
    chat: bool

    def _body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _choice(self, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if role else (
            {"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def first(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role."""
        return self._body([self._choice(None, None, role=True)]) if self.chat else None

    def text(self, text: str) -> dict[str, Any]:
        return self._body([self._choice(text, None)])

    def finish(self, reason: str) -> dict[str, Any]:
        return self._body([self._choice(None, reason)])

    def usage(self, usage: Usage) -> dict[str, Any]:
        return self._body([], usage=usage.model_dump())


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_chunks(run: Run, chunks: Chunks, *, include_usage: bool) -> AsyncIterator[str]:
    """SSE text: (chat) the role chunk, one chunk per text delta, the finish chunk, usage, [DONE].

    If the client goes away the response task is cancelled here, and `finally` cancels the
    generation: the batch drops it within one step.
    """
    try:
        if (first := chunks.first()) is not None:
            yield sse(first)
        async for event in run.events():
            if isinstance(event, TokenDelta):
                yield sse(chunks.text(event.text))
            elif isinstance(event, GenerationDone):
                yield sse(chunks.finish(finish_reason(event)))
                if include_usage:
                    yield sse(chunks.usage(usage(event)))
            else:
                yield sse(_event_error(event).body())
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()
