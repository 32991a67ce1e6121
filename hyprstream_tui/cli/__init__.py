"""The `hyprstream` command. No arguments opens the TUI.

One module per verb family (models, lora, train, generate, serve, tui), each with an `add_*_commands`
function that registers its verbs; handlers take the parsed namespace and return an exit code.
Heavy modules (torch, pygit2, textual) are imported inside handlers, and only the parser of the
verb a command line uses is built (cli/lazy.py), so `hyprstream --help` and `hyprstream model list`
start fast. `main` maps errors to one line and an exit code; a message about a setting names its
flag (`--learning-rate`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence, cast

from hyprstream_tui import __version__
from hyprstream_tui.cli.cache import add_cache_commands
from hyprstream_tui.cli.common import flag
from hyprstream_tui.cli.engine import add_engine_commands
from hyprstream_tui.cli.generate import add_infer_commands
from hyprstream_tui.cli.lazy import NotBuilt, Verbs, verb_of
from hyprstream_tui.cli.lora import add_export_commands, add_lora_commands
from hyprstream_tui.cli.models import add_model_commands
from hyprstream_tui.cli.serve import add_serve_commands
from hyprstream_tui.cli.share import add_share_commands
from hyprstream_tui.cli.train import add_train_commands
from hyprstream_tui.cli.tui import add_tui_commands, cmd_tui
from hyprstream_tui.cli.web import add_web_commands

INTERRUPTED = "error: interrupted; what was complete is kept."


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The `hyprstream` parser; with `verb`, only that verb's parser is filled in (cli/lazy.py)."""
    parser = argparse.ArgumentParser(
        prog="hyprstream",
        description="A terminal workstation for local LLMs: models as git repositories, LoRA adapters as branches, "
                    "checkpoints as commits. Without a command it opens the TUI.",
    )
    parser.add_argument("--version", action="version", version=f"hyprstream {__version__}")
    parser.add_argument("--home", default=None, help="data folder (default: $HYPRSTREAM_HOME or ~/.cache/hyprstream)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = cast(Verbs, parser.add_subparsers(dest="command", metavar="COMMAND", action=Verbs))
    sub.only = verb
    model_sub = add_model_commands(sub)
    lora_sub = add_lora_commands(sub)
    add_train_commands(lora_sub)
    add_export_commands(lora_sub)
    add_share_commands(model_sub, lora_sub)
    add_infer_commands(sub)
    add_engine_commands(sub)
    add_cache_commands(sub)
    add_serve_commands(sub)
    add_tui_commands(sub)
    add_web_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from hyprstream_tui import interrupt

    previous = interrupt.during_start_up()  # Ctrl-C while parsing: one line and out (nothing written yet)
    try:
        try:
            args = build_parser(verb_of(sys.argv[1:] if argv is None else argv)).parse_args(argv)
        except NotBuilt:
            args = build_parser().parse_args(argv)
    finally:
        interrupt.restore(previous)
    from hyprstream_tui.errors import HyprError

    if args.command is None:
        args.func = cmd_tui
    try:
        with interrupt.redelivered():
            code = int(args.func(args) or 0)
        if argv is None and getattr(args, "leave_at_once", False):
            leave_at_once(code)
        return code
    except HyprError as exc:
        if args.debug:
            raise
        print(f"error: {exc.worded(flag)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a full disk is never a bug, wherever a library reported it
        from hyprstream_tui.errors import StorageError, is_disk_full

        if interrupt.caused_by_interrupt(exc) and not args.debug:  # a Ctrl-C that a library wrapped
            print(INTERRUPTED, file=sys.stderr)
            return 130

        if args.debug or not is_disk_full(exc):
            raise
        print(f"error: Not enough disk space for `hyprstream {args.command}`: free some space and try again "
              "(what was committed before is kept).", file=sys.stderr)
        return StorageError.exit_code


def leave_at_once(code: int) -> None:
    """End this process now, its output flushed, without the interpreter's teardown (about 10 ms of
    finalizing modules and objects, a twentieth of a warm `infer`). Only for a command that said it
    holds nothing else to finish (`args.leave_at_once`: a reply from the keep-alive engine, whose
    connection is closed) and only as the process's own entry point (`argv` None), never inside
    a caller's process. Where flushing fails (a closed pipe) the usual way out reports it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code)


__all__ = ["build_parser", "leave_at_once", "main"]
