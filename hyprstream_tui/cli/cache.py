"""`hyprstream cache list | prune`: derived data under the home's cache folder that a later load
can make again (today: quantized weights, engine/tuned/quant_cache.py)."""

from __future__ import annotations

import argparse

from hyprstream_tui.cli.common import print_json


def add_cache_commands(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache", help="quantized weights kept between loads: list, prune")
    csub = cache.add_subparsers(dest="cache_cmd", required=True, metavar="COMMAND")
    p = csub.add_parser("list", help="the cached quantized weights: size and last use")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache_list)
    p = csub.add_parser("prune", help="remove cached quantized weights (the next --quantize load makes them again)")
    p.add_argument("--keep", default="0", metavar="SIZE",
                   help="keep the most recently used entries up to SIZE (e.g. 2GB; default: remove all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache_prune)


def cmd_cache_list(args: argparse.Namespace) -> int:
    from hyprstream_tui import units
    from hyprstream_tui.engine.tuned import quant_cache
    from hyprstream_tui.settings import Paths

    where = quant_cache.folder(Paths.from_env(args.home).cache)
    entries = sorted(where.glob(f"*{quant_cache.SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if where.is_dir() else []
    rows: list[dict[str, str | int | float]] = [
        {"entry": p.stem, **quant_cache.describe(p), "bytes": p.stat().st_size, "used": p.stat().st_mtime}
        for p in entries]
    if args.json:
        print_json({"folder": str(where), "cap_bytes": quant_cache.cap(), "entries": rows})
        return 0
    sizes = [p.stat().st_size for p in entries]
    print(f"{len(rows)} cached quantized model(s), {units.size(sum(sizes))} of {units.size(quant_cache.cap())} "
          f"(${quant_cache.ENV_MAX}) in {where}")
    for p, r in zip(entries, rows):
        what = f"{r.get('model', '?')} {str(r.get('commit', ''))[:7]} {r.get('scheme', '')}"
        print(f"  {what:<30} {units.size(p.stat().st_size):>9}  last used {units.when(p.stat().st_mtime)}  {p.stem}")
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from hyprstream_tui import units
    from hyprstream_tui.engine.tuned import quant_cache
    from hyprstream_tui.errors import InvalidInput
    from hyprstream_tui.settings import Paths

    try:
        keep = units.parse_size(args.keep)
    except ValueError:
        raise InvalidInput(f"--keep takes a size such as 500MB or 2GB, got {args.keep!r}.") from None
    done = quant_cache.prune(Paths.from_env(args.home).cache, keep_bytes=keep)
    if args.json:
        print_json(done)
        return 0
    print(f"Removed {done.removed} cached file(s), {units.size(done.freed_bytes)} freed; "
          f"{done.kept} kept ({units.size(done.kept_bytes)}).")
    return 0
