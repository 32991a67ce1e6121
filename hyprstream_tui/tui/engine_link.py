"""How the TUI reaches the engine: the in-process `Engine`, or a hyprstream/OpenAI server given with
`--remote URL`. Both answer `chat(spec, messages, params, on_event=, request_id=)` with a job that
can be cancelled and waited on, and report through the engine's own event dataclasses.

Only blocking code runs here (inside the TUI's thread workers); nothing imports torch at module
level.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from hyprstream_tui.engine.events import (
    EventCallback,
    FinishReason,
    GenerationDone,
    Provenance,
    Timings,
    TokenDelta,
)
from hyprstream_tui.engine.jobs import ChatEngine, Job, ignore, new_request_id
from hyprstream_tui.errors import HubError, HyprError

if TYPE_CHECKING:
    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.store import Store


def preload() -> None:
    """Import what the first chat or training run needs, once, after the first paint: their lazy
    modules are not safe to import from two threads at once. (importlib keeps the TUI's own source
    free of direct torch/transformers/peft imports.)"""
    import importlib

    transformers = importlib.import_module("transformers")
    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig", "PreTrainedTokenizerFast"):
        getattr(transformers, name)
    peft = importlib.import_module("peft")
    for name in ("LoraConfig", "PeftModel", "get_peft_model", "set_peft_model_state_dict", "get_peft_model_state_dict"):
        getattr(peft, name)
    importlib.import_module("hyprstream_tui.engine.engine")


def make_engine(store: "Store", *, remote: str | None = None) -> ChatEngine:
    """The engine the TUI talks to: a server with `--remote`, else an Engine in a child process
    (so this process never runs, or imports, torch)."""
    if remote:
        return RemoteEngine(remote)
    from hyprstream_tui.engine.child import ChildEngine

    return ChildEngine(store.paths)


def run_chats(engine: ChatEngine, specs: Sequence[str], messages: Sequence[Mapping[str, str]],
              params: "SamplingParams", *, request_ids: Sequence[str], on_event: EventCallback,
              cancel: threading.Event) -> list[GenerationDone]:
    """Start one generation per spec, pass `cancel` on to them, and wait for all."""
    jobs = [engine.chat(spec, messages, params, on_event=on_event, request_id=rid)
            for spec, rid in zip(specs, request_ids)]
    try:
        while not all(job.finished for job in jobs):
            if cancel.wait(0.05):
                for job in jobs:
                    job.cancel()
                for job in jobs:
                    job.wait()
    finally:
        for job in jobs:
            if not job.finished:
                job.cancel()
    return [job.result() for job in jobs]


def reply_meta(done: GenerationDone, *, side: str = "a") -> dict[str, Any]:
    """What a saved reply keeps: provenance, usage, speed, how it ended."""
    return {
        "provenance": asdict(done.provenance),
        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
        "tok_s": round(done.timings.decode_tok_s, 2),
        "finish_reason": done.finish_reason,
        "dropped_messages": done.dropped_messages,
        "side": side,
    }


# ---- a remote server speaking the OpenAI chat API (hyprstream serve, vLLM, ...) ---------------------
class RemoteEngine:
    """`/v1/chat/completions` with SSE streaming, through `hyprstream_tui.client.Client` (httpx);
    `model:adapter` names pass through unchanged. A cancelled job hangs up, and the server stops
    its generation."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 30.0) -> None:
        import os

        from hyprstream_tui.client import Client  # httpx: imported with the engine, after the first paint

        self.url = url.rstrip("/") + "/"
        self.api_key = api_key or os.environ.get("HYPRSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.client = Client(url, api_key=self.api_key, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def model_ids(self) -> list[str]:
        """`GET /v1/models`: ids such as `model` and `model:adapter`."""
        try:
            return self.client.models()
        except (ValueError, KeyError, TypeError) as exc:  # an answer that is not an OpenAI model list
            raise HubError(f"Cannot list the models of {self.url} ({type(exc).__name__}): check --remote.") from None

    def chat(self, spec: str, messages: Sequence[Mapping[str, str]], params: "SamplingParams", *,
             on_event: EventCallback | None = None, request_id: str | None = None) -> Job:
        job = Job(request_id or new_request_id())
        job.thread = threading.Thread(target=self._run, args=(job, spec, list(messages), params,
                                                              on_event or ignore), daemon=True)
        job.thread.start()
        return job

    def _run(self, job: Job, spec: str, messages: list[Mapping[str, str]], params: "SamplingParams",
             on_event: EventCallback) -> None:
        try:
            job.done = self._stream(job, spec, messages, params, on_event)
            on_event(job.done)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting worker
            job.error = exc if isinstance(exc, HyprError) else HubError(f"The server at {self.url} failed: {exc}.")
        finally:
            job.finish()

    def _stream(self, job: Job, spec: str, messages: list[Mapping[str, str]], params: "SamplingParams",
                on_event: EventCallback) -> GenerationDone:
        body: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p,
                                "max_tokens": params.max_tokens, "seed": params.seed}
        started, pieces = time.perf_counter(), []
        finish: FinishReason = "stop"
        # Leaving the `closing` block closes the response: a cancelled job hangs up mid-stream.
        with contextlib.closing(self.client.chunks(model=spec, messages=messages, **body)) as chunks:
            for chunk in chunks:
                if job.cancelled:
                    finish = "cancelled"
                    break
                choice = (chunk.get("choices") or [{}])[0]
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    pieces.append(text)
                    on_event(TokenDelta(request_id=job.request_id, text=text, tokens=len(pieces)))
                finish = _finish_reason(choice.get("finish_reason")) or finish
        # What a server reports is all there is: OpenAI's API names no commits.
        model, _, adapter = spec.partition(":")
        return GenerationDone(request_id=job.request_id, text="".join(pieces), finish_reason=finish,
                              provenance=Provenance(model=model, model_commit=None, adapter=adapter or None,
                                                    params=params.as_dict(), seed=params.seed or 0, device=self.url),
                              timings=Timings(decode_s=time.perf_counter() - started, completion_tokens=len(pieces)))


def _finish_reason(reason: object) -> FinishReason | None:
    """An OpenAI finish_reason as ours ("length" stays, anything else ended on a stop)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
