"""`hyprstream tui` (and `hyprstream` alone): the terminal workstation."""

from __future__ import annotations

import argparse


def add_tui_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tui", help="open the terminal workstation (the default)")
    p.add_argument("--remote", default=None, help="use a hyprstream/OpenAI server at URL for chat")
    p.set_defaults(func=cmd_tui)


def cmd_tui(args: argparse.Namespace) -> int:
    from hyprstream_tui.tui.app import run_app

    return run_app(home=args.home, remote=getattr(args, "remote", None))
