"""`hyprstream engine status | stop`: the home's keep-alive engine process (engine/keepalive.py),
which `infer` and `chat` start on demand and which keeps their models loaded between commands."""

from __future__ import annotations

import argparse
import time

from hyprstream_tui.cli.common import print_json


def add_engine_commands(sub: argparse._SubParsersAction) -> None:
    engine = sub.add_parser("engine", help="the keep-alive engine process of `infer` and `chat`")
    esub = engine.add_subparsers(dest="engine_cmd", required=True, metavar="COMMAND")
    p = esub.add_parser("status", help="is one running for this home: pid, idle timeout, loaded models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_engine_status)
    p = esub.add_parser("stop", help="stop it now (the next `infer` starts a new one)")
    p.set_defaults(func=cmd_engine_stop)


def cmd_engine_status(args: argparse.Namespace) -> int:
    import dataclasses

    from hyprstream_tui import units
    from hyprstream_tui.engine.keepalive_client import status
    from hyprstream_tui.engine.keepalive_protocol import EngineFiles
    from hyprstream_tui.settings import Paths

    paths = Paths.from_env(args.home)
    info = status(paths)
    if args.json:
        print_json({"running": False, "socket": str(EngineFiles.of(paths).socket)} if info is None
                   else {"running": True, **dataclasses.asdict(info)})
        return 0
    if info is None:
        print("No engine process is running for this home (`hyprstream infer` starts one).")
        return 0
    idle = f", idle for {units.duration(info.idle_s)}" if not info.connections else \
        f", {info.connections} command(s) connected"
    warming = "" if info.ready else ", warming up"
    print(f"Engine process {info.pid}: up {units.duration(time.time() - info.started)}{idle}{warming}; "
          f"stops after {units.duration(info.keep_alive_s)} idle.")
    for m in info.models:
        quantized = f", {m.quantize}" if m.quantize else ""
        print(f"  loaded: {m.name} ({(m.commit or 'folder')[:12]}, {m.dtype}, {m.device}{quantized})")
    if not info.models:
        print("  no model loaded")
    print(f"  socket: {info.socket}")
    print(f"  log:    {info.log}")
    return 0


def cmd_engine_stop(args: argparse.Namespace) -> int:
    from hyprstream_tui.engine.keepalive_client import stop
    from hyprstream_tui.settings import Paths

    pid = stop(Paths.from_env(args.home))
    print("No engine process was running for this home." if pid is None else f"Stopped the engine process {pid}.")
    return 0
