"""`hyprstream lora create | list | log | tag | rollback | export | merge`: adapters as branches,
checkpoints as commits. (`lora train ...` is cli/train.py.)"""

from __future__ import annotations

import argparse

from hyprstream_tui import units
from hyprstream_tui.cli.common import adapter_arg, console, find_adapter, path_arg, print_json, store_from


def add_lora_commands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """`lora` and its branch verbs; returns its subparsers, for `train`, `export` and `merge`."""
    lora = sub.add_parser("lora", help="LoRA adapters: create, list, log, tag, roll back, train")
    lsub = lora.add_subparsers(dest="lora_cmd", required=True, metavar="COMMAND")

    p = lsub.add_parser("create", help="create an adapter branch on a model")
    p.add_argument("--name", required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lora_create)

    p = lsub.add_parser("list", help="adapters of one model, or of all")
    p.add_argument("model", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lora_list)

    p = lsub.add_parser("log", help="checkpoints of an adapter, newest first")
    p.add_argument("name", help="ADAPTER or MODEL:ADAPTER")
    p.add_argument("--model")
    p.add_argument("-n", "--limit", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lora_log)

    p = lsub.add_parser("tag", help="tag a checkpoint as <adapter>/<label>")
    p.add_argument("name", help="ADAPTER or MODEL:ADAPTER")
    p.add_argument("label")
    p.add_argument("--commit", help="commit, tag or step:N (default: the tip)")
    p.add_argument("--model")
    p.add_argument("--force", action="store_true", help="move an existing tag")
    p.set_defaults(func=cmd_lora_tag)

    p = lsub.add_parser("rollback", help="new commit restoring a checkpoint (history is kept)")
    p.add_argument("name", help="ADAPTER or MODEL:ADAPTER")
    p.add_argument("target", help="commit, tag or step:N")
    p.add_argument("--model")
    p.set_defaults(func=cmd_lora_rollback)
    return lsub


def add_export_commands(lora_sub: argparse._SubParsersAction) -> None:
    """`lora export` and `lora merge`: an adapter out of the store, or into a new model."""
    p = lora_sub.add_parser("export", help="write an adapter as one .safetensors file, a PEFT folder (vLLM) or a LoRA GGUF (llama.cpp)")
    adapter_arg(p)
    p.add_argument("--output", "-o", type=path_arg, required=True,
                   help="FILE.safetensors, DIR with --format peft, FILE.gguf with --format gguf")
    p.add_argument("--format", choices=("safetensors", "peft", "gguf"), default="safetensors")
    p.add_argument("--commit", help="commit, tag or step:N (default: the tip)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_lora_export)

    p = lora_sub.add_parser("merge", help="merge an adapter into its base as a new model repository")
    adapter_arg(p)
    p.add_argument("--name", dest="new_name", required=True, help="name of the new model")
    p.add_argument("--commit", help="commit, tag or step:N (default: the tip)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.set_defaults(func=cmd_lora_merge)


def cmd_lora_create(args: argparse.Namespace) -> int:
    store = store_from(args)
    targets = [t for t in args.target_modules.split(",") if t.strip()]
    info = store.create_adapter(args.base_model, args.name, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                target_modules=targets)
    if args.json:
        print_json(info)
    else:
        print(f"Created adapter {info.name} on {info.model}: branch {info.branch}, commit {info.tip[:7]}, worktree {info.worktree}")
    return 0


def cmd_lora_list(args: argparse.Namespace) -> int:
    store = store_from(args)
    models = [args.model] if args.model is not None else [m.name for m in store.list_models()]
    rows = [a for m in models for a in store.list_adapters(m)]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("No adapters yet: `hyprstream lora create --name NAME --base-model MODEL`.")
        return 0
    from rich.table import Table

    table = Table("model", "name", "branch", "tip", box=None)
    for a in rows:
        table.add_row(a.model, a.name, a.branch, a.tip[:7])
    console().print(table)
    return 0


def cmd_lora_log(args: argparse.Namespace) -> int:
    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    commits = store.log(adapter.model, adapter.uuid, args.limit)
    if args.json:
        print_json(commits)
        return 0
    for c in commits:
        metrics = "  ".join(f"{k}={v}" for k, v in c.metrics.items() if k in ("loss", "lr", "samples", "tokens"))
        tags = f"  ({', '.join(c.tags)})" if c.tags else ""
        print(f"{c.short}  {c.summary:<40} {metrics}{tags}")
    return 0


def cmd_lora_tag(args: argparse.Namespace) -> int:
    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    tag = store.tag(adapter.model, adapter.uuid, args.label, commit=args.commit, force=args.force)
    print(f"Tagged {tag}.")
    return 0


def cmd_lora_rollback(args: argparse.Namespace) -> int:
    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    info = store.rollback(adapter.model, adapter.uuid, args.target)
    print(f"{info.summary}: new commit {info.short} on {adapter.branch} (history kept).")
    return 0


def cmd_lora_export(args: argparse.Namespace) -> int:
    import json
    import sys

    from hyprstream_tui.engine.gguf_export_lora import export_lora_gguf, vllm_warnings
    from hyprstream_tui.engine.train.export import export_adapter

    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    if args.format == "gguf":
        gguf = export_lora_gguf(store, adapter.model, adapter.uuid, args.output, rev=args.commit, force=args.force)
        path, commit, size = gguf.path, gguf.commit, gguf.size
    else:
        result = export_adapter(store, adapter.model, adapter.uuid, args.output, fmt=args.format, rev=args.commit,
                                force=args.force)
        path, commit, size = result.path, result.commit, result.size
    print(f"Exported {adapter.name} at {commit[:7]} to {path} ({args.format}, {units.size(size)}).")
    if args.format == "peft":  # the folder `vllm serve --enable-lora --lora-modules NAME=DIR` reads
        for line in vllm_warnings(json.loads((path / "adapter_config.json").read_text())):
            print(f"warning: {line}", file=sys.stderr)
    return 0


def cmd_lora_merge(args: argparse.Namespace) -> int:
    from hyprstream_tui.engine.train.export import merge_adapter

    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    summary = merge_adapter(store, adapter.model, adapter.uuid, args.new_name,
                            rev=args.commit, dtype=args.dtype)
    print(f"Merged {adapter.name} into a new model {summary.name}: {units.count(summary.parameters)} params, "
          f"commit {summary.head[:7]}.")
    return 0
