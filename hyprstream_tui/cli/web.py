"""`hyprstream web`: the workstation in a browser (textual-serve), one app process per tab."""

from __future__ import annotations

import argparse
import os


def add_web_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="serve the workstation to a browser (one app process per tab)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; another needs a token)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", default=None,
                   help="require ?token=TOKEN on the page, which keeps it in a cookie (default: $HYPRSTREAM_WEB_TOKEN)")
    p.add_argument("--max-sessions", type=int, default=4,
                   help="browser tabs (app processes) at once; the next one gets a 'sessions in use' page")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another Host name to answer, such as a reverse proxy's (besides loopback and --host); "
                        "repeatable")
    p.set_defaults(func=cmd_web)


def cmd_web(args: argparse.Namespace) -> int:
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.web.server import TOKEN_ENV, WebConfig, serve

    config = WebConfig(home=Paths.from_env(args.home).home, host=args.host, port=args.port,
                       token=args.token or os.environ.get(TOKEN_ENV) or None,
                       max_sessions=args.max_sessions, allowed_hosts=tuple(args.allowed_host))
    serve(config, debug=args.debug)
    return 0
