"""`hyprstream model list | info | import | pull | rm | export`: the models in the store."""

from __future__ import annotations

import argparse
import sys

from hyprstream_tui import units
from hyprstream_tui.cli.common import console, path_arg, print_json, store_from


def add_model_commands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """`model` and its verbs; returns its subparsers, for the sharing verbs (cli/share.py)."""
    model = sub.add_parser("model", help="pull, import, list, inspect and remove models")
    msub = model.add_subparsers(dest="model_cmd", required=True, metavar="COMMAND")

    p = msub.add_parser("list", help="models in the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_model_list)

    p = msub.add_parser("info", help="config, files, LFS objects, branches, tags and commits of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_info)

    p = msub.add_parser("import", help="import a local model folder (config.json + *.safetensors) or a .gguf file")
    p.add_argument("dir", type=path_arg, metavar="PATH", help="a Hugging Face model folder, or a GGUF file (llama.cpp, Ollama, LM Studio)")
    p.add_argument("--name", help="store name (default: the folder's name, or the file's without .gguf)")
    p.add_argument("--link", action="store_true", help="hard-link the weights instead of copying them (same filesystem)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt pickle files (they can run code)")
    p.set_defaults(func=cmd_model_import)

    p = msub.add_parser("pull", help="download ORG/NAME from the Hugging Face Hub")
    p.add_argument("repo_id", metavar="ORG/NAME")
    p.add_argument("--name", help="store name (default: NAME)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt pickle files (they can run code)")
    p.add_argument("--token", default=None, help="hub token (default: HF_TOKEN / huggingface-cli login)")
    p.set_defaults(func=cmd_model_pull)

    p = msub.add_parser("rm", help="remove a model, its adapters and worktrees")
    p.add_argument("name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p.set_defaults(func=cmd_model_rm)

    p = msub.add_parser("export", help="write a model (an adapter merged in) as one GGUF file for llama.cpp, Ollama, LM Studio")
    p.add_argument("model", metavar="MODEL[:ADAPTER]", help="a model, or a model and an adapter to merge into it")
    p.add_argument("--format", choices=("gguf",), default="gguf")
    p.add_argument("--outtype", default="f16", metavar="{f32,f16,bf16,q8_0}",
                   help="type of the matrices (default f16; norms stay f32)")
    p.add_argument("--output", "-o", type=path_arg, required=True, help="FILE.gguf")
    p.add_argument("--commit", help="the adapter's commit, tag or step:N (without an adapter: the model's commit)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_model_export)
    return msub


def cmd_model_list(args: argparse.Namespace) -> int:
    models = store_from(args).list_models()
    if args.json:
        print_json(models)
        return 0
    if not models:
        print("No models yet: `hyprstream model pull ORG/NAME`, `hyprstream model import DIR`, or open `hyprstream` for the demo.")
        return 0
    from rich.table import Table

    table = Table("name", "architecture", "params", "dtype", "size", "adapters", "commit", box=None)
    for m in models:
        table.add_row(m.name, m.architecture, units.count(m.parameters), m.dtype, units.size(m.size_bytes),
                      str(m.adapters), m.head[:7])
    console().print(table)
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    info = store_from(args).model_info(args.name)
    if args.json:
        print_json(info)
        return 0
    s = info.summary
    out = console()
    out.print(f"[bold]{s.name}[/]  {s.architecture}  {units.count(s.parameters)} params  {s.dtype}  "
              f"{units.size(s.size_bytes)} on disk")
    out.print(f"source: {s.source}   main: {s.head[:12]}")
    out.print("config: " + ", ".join(f"{k}={v}" for k, v in info.config.items()))
    out.print("files:")
    for f in info.files:
        lfs = f"lfs {f.oid[:12]}" + ("" if f.present else " MISSING") if f.lfs else "git"
        out.print(f"  {f.path:<40} {units.size(f.size):>10}  {lfs}")
    out.print("adapters: " + (", ".join(f"{a.name} ({a.branch}, {a.tip[:7]})" for a in info.adapters) or "none"))
    out.print("tags: " + (", ".join(info.tags) or "none"))
    out.print("last commits on main:")
    for c in info.commits:
        out.print(f"  {c.short} {c.summary}")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    from hyprstream_tui.cli.progress import ByteProgress
    from hyprstream_tui.engine.gguf import import_gguf, is_gguf

    path = args.dir.expanduser()
    if is_gguf(path):
        with ByteProgress("importing") as bar:
            summary = import_gguf(store_from(args), path, name=args.name, progress=bar)
        print(f"Imported {summary.name}: {summary.architecture}, {units.count(summary.parameters)} params, "
              f"{summary.dtype}, {units.size(summary.size_bytes)} on disk, commit {summary.head[:7]}")
        return 0
    with ByteProgress("importing") as bar:
        summary = store_from(args).import_model(path, name=args.name, link=args.link, allow_pickle=args.allow_pickle,
                                                progress=bar)
    print(f"Imported {summary.name}: {summary.architecture}, {units.count(summary.parameters)} params, "
          f"{units.size(summary.size_bytes)} on disk, commit {summary.head[:7]}")
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    from hyprstream_tui.cli.progress import ByteProgress

    with ByteProgress(f"pulling {args.repo_id}") as bar:
        summary = store_from(args).pull_model(args.repo_id, name=args.name, revision=args.revision,
                                              allow_pickle=args.allow_pickle, token=args.token, progress=bar)
    print(f"Pulled {args.repo_id} as {summary.name}: {units.count(summary.parameters)} params, "
          f"{units.size(summary.size_bytes)} on disk, commit {summary.head[:7]}")
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    from hyprstream_tui.cli.progress import ByteProgress
    from hyprstream_tui.engine.gguf_export import check_outtype, export_model_gguf

    check_outtype(args.outtype)  # before any loading
    with ByteProgress("exporting") as bar:
        result = export_model_gguf(store_from(args), args.model, args.output, outtype=args.outtype, rev=args.commit,
                                   force=args.force, progress=bar)
    print(f"Exported {args.model} at {result.commit[:7]} to {result.path} (gguf {result.outtype}, "
          f"{result.tensors} tensors, {units.size(result.size)}).")
    return 0


def cmd_model_rm(args: argparse.Namespace) -> int:
    store = store_from(args)
    store.model_dir(args.name)  # NotFound before asking
    if not args.yes:
        if not sys.stdin.isatty():
            from hyprstream_tui.errors import InvalidInput

            raise InvalidInput(f"Refusing to remove {args.name!r} without a terminal to ask: pass --yes.")
        answer = input(f"Remove model {args.name!r} with all its adapters and checkpoints? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing removed.")
            return 1
    store.remove_model(args.name)
    print(f"Removed {args.name}.")
    return 0
