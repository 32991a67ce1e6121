"""`hyprstream infer` and `hyprstream chat`: a reply to one prompt, or a line-by-line chat.

`run_infer` / `run_chat` take plain values and a `write` callback, so they are testable without a
terminal; `cmd_infer` / `cmd_chat` wire them to the parsed arguments. Ctrl-C while a reply streams
cancels it within one decode step. The engine loads inside the handlers: no torch at import.

By default both talk to the home's keep-alive engine (engine/keepalive.py), a process that keeps
the model loaded between commands and is started on demand: the client side imports no torch, so
a second `infer` answers in well under a second. `--no-keep-alive` or HYPRSTREAM_KEEP_ALIVE=0
runs the engine in this process instead, as before; HYPRSTREAM_KEEP_ALIVE=<seconds> (or 5m) is
how long an idle engine process stays.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Callable

from hyprstream_tui.cli.common import flag
from hyprstream_tui.errors import Cancelled, InvalidInput

if TYPE_CHECKING:
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.events import Event, EventCallback, GenerationDone
    from hyprstream_tui.engine.jobs import ChatEngine, Job
    from hyprstream_tui.engine.keepalive_client import KeepAliveClient
    from hyprstream_tui.engine.keepalive_protocol import Loading
    from hyprstream_tui.engine.light import LightEngine
    from hyprstream_tui.engine.params import SamplingParams

Write = Callable[[str], Any]
CHAT_HELP = "Commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves."


def make_engine(*, home: str | None = None, dtype: str = "auto", device: str = "auto",
                quantize: str | None = None, allow_pickle: bool = False,
                threads: int | None = None) -> Engine:
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    options = LoadOptions(dtype=dtype, device=device, quantize=quantize, allow_pickle=allow_pickle)
    return Engine(store=Store(Paths.from_env(home)), options=options, threads=threads, max_models=1)


def wait_streaming(job: Job, events: Any, on_event: Callable[[Event], None]) -> GenerationDone:
    """Hand `job`'s queued events to `on_event` until it ends; Ctrl-C cancels it and raises
    Cancelled once the engine has stopped (within one decode step)."""
    import queue

    interrupted = False
    while True:
        try:  # a Ctrl-C while an event is shown counts too: text streams fast from an engine process
            try:
                event = events.get(timeout=0.1)
            except queue.Empty:
                if job.finished and events.empty():  # ended with no event: its engine process died
                    break
                continue
            on_event(event)
            if job.finished and events.empty():
                break
        except KeyboardInterrupt:
            job.cancel()
            interrupted = True
    done = job.result()
    if interrupted:
        raise Cancelled("Stopped: the reply so far is shown above.")
    return done


def begin_infer(
    engine: Engine | KeepAliveClient, spec: str, prompt: str, params: SamplingParams, *,
    system: str | None, raw: bool, on_event: EventCallback,
) -> Job:
    """The engine side decides between the chat template and plain text (and loads the model):
    the keep-alive engine process, or this process's engine."""
    from hyprstream_tui.engine.keepalive_client import KeepAliveClient

    if isinstance(engine, KeepAliveClient):
        return engine.infer(spec, prompt, params, system=system, raw=raw, on_event=on_event)
    from hyprstream_tui.engine.keepalive import start_infer

    return start_infer(engine, spec, prompt, params, system=system, raw=raw, on_event=on_event)


def run_infer(
    engine: Engine | KeepAliveClient, spec: str, prompt: str, params: SamplingParams, *,
    system: str | None = None, raw: bool = False, as_json: bool = False,
    write: Write | None = None, read_stdin: Callable[[], str] | None = None,
) -> GenerationDone:
    """Answer one prompt (`-` reads stdin): streamed to `write`, or one JSON object with --json.

    With a chat template and not `raw`, the prompt is a user message (after `system`);
    otherwise it is continued as plain text. `load_s` is the ModelLoaded event's (0 when the
    model was loaded already).
    """
    import queue

    from hyprstream_tui.engine.events import ModelLoaded, TokenDelta

    out = write or stdout_write
    if prompt == "-":
        prompt = (read_stdin or sys.stdin.read)()
    events: queue.Queue[Event] = queue.Queue()
    job = begin_infer(engine, spec, prompt, params, system=system, raw=raw, on_event=events.put)
    load_s = 0.0
    shown = False

    def show(event: Event) -> None:
        nonlocal load_s, shown
        if isinstance(event, ModelLoaded):
            load_s = event.seconds
        elif isinstance(event, TokenDelta) and not as_json:
            shown = True
            out(event.text)
            flush(out)

    answered = False
    try:
        done = wait_streaming(job, events, show)
        answered = True
    finally:  # a request the engine refused before any text (an unknown model) prints nothing
        if not as_json and (answered or shown or job.cancelled):
            out("\n")
    if as_json:
        import json

        data = {"model": spec, **done.as_dict()}
        data["timings"]["load_s"] = round(load_s, 4)
        out(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    return done


def run_chat(
    engine: ChatEngine, spec: str, params: SamplingParams, *, system: str | None = None,
    read_line: Callable[[str], str] = input, write: Write | None = None,
) -> list[dict[str, str]]:
    """A plain line-by-line chat; returns the conversation when the user leaves."""
    import queue

    from hyprstream_tui.engine.events import ContextTrimmed, TokenDelta

    out = write or stdout_write
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    out(f"Chatting with {spec}. {CHAT_HELP}\n")
    while True:
        try:
            line = read_line("you> ")
        except (EOFError, KeyboardInterrupt):
            out("\n")
            return messages
        if line.strip() in ("/exit", "/quit"):
            return messages
        if line.strip() == "/reset":
            messages = list(base)
            out("(conversation forgotten)\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        events: queue.Queue[Event] = queue.Queue()
        job = engine.chat(spec, messages, params, on_event=events.put)
        pieces: list[str] = []

        def show(event: Event) -> None:
            if isinstance(event, ContextTrimmed):
                out(f"(left out the {event.dropped_messages} oldest messages to fit the "
                    f"{event.window}-token window)\n")
            elif isinstance(event, TokenDelta):
                if not pieces:
                    out("assistant> ")
                pieces.append(event.text)
                out(event.text)
                flush(out)

        try:
            wait_streaming(job, events, show)
            out("\n")
        except Cancelled:
            out(" [stopped]\n")
        except InvalidInput as exc:  # e.g. a message longer than the window: say so, go on
            messages.pop()
            out(f"error: {exc.worded(flag)}\n")
            continue
        messages.append({"role": "assistant", "content": "".join(pieces)})


def stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def flush(write: Write) -> None:
    owner = getattr(write, "__self__", None)
    if owner is not None and hasattr(owner, "flush"):
        owner.flush()


# ---- argparse wiring ------------------------------------------------------------------------
def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the best")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 is off")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default 256)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="int8 weights, or int4 in groups of 32 (CPU)")
    p.add_argument("--allow-pickle", action="store_true", help="load pickle weights you trust")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")


def add_infer_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="generate a reply to one prompt, streamed")
    p.add_argument("model", metavar="MODEL[:ADAPTER[@REV]]")
    p.add_argument("--prompt", required=True, help="the prompt; - reads stdin")
    p.add_argument("--raw", action="store_true", help="continue the text, no chat template")
    p.add_argument("--json", action="store_true", help="one JSON object with text and timings")
    add_sampling_arguments(p)
    add_keep_alive_argument(p)
    p.set_defaults(func=cmd_infer)
    p = sub.add_parser("chat", help="a plain line-by-line chat in the terminal")
    p.add_argument("model", metavar="MODEL[:ADAPTER[@REV]]")
    add_sampling_arguments(p)
    add_keep_alive_argument(p)
    p.set_defaults(func=cmd_chat)


def add_keep_alive_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-keep-alive", action="store_true",
                   help="load the model in this process, not in the home's keep-alive engine "
                        "(also: HYPRSTREAM_KEEP_ALIVE=0)")


def params_from_args(args: argparse.Namespace) -> SamplingParams:
    from hyprstream_tui.engine.params import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed,
        stop=tuple(args.stop),
    )


def keep_alive_of(args: argparse.Namespace) -> float | None:
    """The keep-alive engine's idle timeout for this command; None: keep-alive off."""
    import os

    from hyprstream_tui.engine.keepalive_protocol import ENV, keep_alive_seconds

    return None if getattr(args, "no_keep_alive", False) else keep_alive_seconds(os.environ.get(ENV))


def loading_of(args: argparse.Namespace) -> Loading:
    """This command's load options and threads."""
    from hyprstream_tui.engine.keepalive_protocol import Loading

    return Loading(dtype=args.dtype, device=args.device, quantize=args.quantize,
                   allow_pickle=args.allow_pickle, threads=args.threads)


def light_engine_from_args(args: argparse.Namespace) -> LightEngine | None:
    """An engine that answers without torch (engine/light.py) where this command's model has a
    step image and nothing else must load it; None: the keep-alive or the in-process engine."""
    from hyprstream_tui.engine.light import engine_for
    from hyprstream_tui.engine.loader import LoadOptions

    loading = loading_of(args)
    return engine_for(args.model, home=getattr(args, "home", None),
                      options=LoadOptions(**loading.load_options()), threads=loading.threads)


def engine_from_args(args: argparse.Namespace) -> Engine | KeepAliveClient:
    """The home's keep-alive engine (started if none runs), or with it off an engine here."""
    keep_alive_s = keep_alive_of(args)
    if keep_alive_s is None:
        return make_engine(home=getattr(args, "home", None), dtype=args.dtype, device=args.device,
                           quantize=args.quantize, allow_pickle=args.allow_pickle, threads=args.threads)
    from hyprstream_tui.engine.keepalive_client import connect
    from hyprstream_tui.settings import Paths

    return connect(Paths.from_env(getattr(args, "home", None)), keep_alive_s=keep_alive_s,
                   loading=loading_of(args), note=lambda line: print(line, file=sys.stderr, flush=True))


def cmd_infer(args: argparse.Namespace) -> int:
    from hyprstream_tui.cli.quick import quick_infer

    if quick_infer(args) is not None:  # the warm path: an engine of ours listens already
        args.leave_at_once = True
        return 0
    params = params_from_args(args)
    light = light_engine_from_args(args)  # a LightEngine, or None
    engine = light or engine_from_args(args)
    try:
        run_infer(engine, args.model, args.prompt, params, system=args.system, raw=args.raw,
                  as_json=args.json)
    finally:
        engine.close()
    if light is not None:
        start_engine_behind(args, light.last_ids)
    # A reply from the keep-alive engine, or one without torch, leaves nothing in this process to
    # finish: `main` may skip the interpreter's teardown (cli.leave_at_once). Not with torch's
    # engine here (--no-keep-alive).
    args.leave_at_once = light is not None or type(engine).__name__ == "KeepAliveClient"
    return 0


def start_engine_behind(args: argparse.Namespace, ids: list[int]) -> None:
    """After a reply without torch, with keep-alive on: start the home's engine process loading
    this model and keeping the KV cache of this conversation's tokens `ids`, so that the next
    command finds it warm (this one does not wait for it)."""
    keep_alive_s = keep_alive_of(args)
    if keep_alive_s is None:
        return
    from hyprstream_tui.engine.keepalive_client import start_behind
    from hyprstream_tui.settings import Paths

    start_behind(Paths.from_env(getattr(args, "home", None)), keep_alive_s, args.model, loading_of(args), ids,
                 note=lambda line: print(line, file=sys.stderr, flush=True))


def cmd_chat(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    engine = engine_from_args(args)
    try:
        run_chat(engine, args.model, params, system=args.system)
    finally:
        engine.close()
    return 0
