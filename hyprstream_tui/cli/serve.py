"""`hyprstream serve`: the OpenAI-compatible HTTP server on the store's models."""

from __future__ import annotations

import argparse
import os
import sys

from hyprstream_tui.cli.common import store_from


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server on the local store's models")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; another needs an API key)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $HYPRSTREAM_API_KEY)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait for a batch row; beyond: 503")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together per model")
    p.add_argument("--max-models", type=int, default=2, help="models kept loaded at once")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another Host name to answer (besides loopback and --host); repeatable")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="int8 weights, or int4 in groups of 32 (CPU; base models only): batches scale best with it on CPUs without native bf16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from hyprstream_tui.errors import InvalidInput
    from hyprstream_tui.server.security import check_bind

    api_key = args.api_key or os.environ.get("HYPRSTREAM_API_KEY") or None
    check_bind(args.host, api_key)
    if not 0 < args.port < 65536:
        raise InvalidInput(f"--port must be between 1 and 65535, got {args.port}.")
    import uvicorn

    from hyprstream_tui.engine.batching import start_warm_up
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions
    from hyprstream_tui.server.app import create_app

    store = store_from(args)
    engine = Engine(store=store, max_models=args.max_models, threads=args.threads,
                    options=LoadOptions(dtype=args.dtype, quantize=args.quantize))
    app = create_app(engine, api_key=api_key, max_queue=args.max_queue, max_batch=args.max_batch,
                     bind=args.host, allowed_hosts=args.allowed_host)
    start_warm_up(store)
    print(f"hyprstream serving on http://{args.host}:{args.port}/v1 (OpenAPI at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
