"""The `hyprstream` command. No arguments opens the TUI.

Each verb family registers itself in an `add_*_commands` function; handlers take the parsed
namespace and return an exit code. Heavy modules (torch, pygit2, textual) are imported inside
handlers, so `hyprstream --help` and `hyprstream model list` start fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from hyprstream_tui import __version__
from hyprstream_tui.errors import HyprError

Handler = Callable[[argparse.Namespace], int]


# ---- shared helpers ---------------------------------------------------------------------------
def _store(args: argparse.Namespace):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return Store(Paths.from_env(args.home))


def _print_json(value: Any) -> None:
    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return dataclasses.asdict(obj)
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(type(obj).__name__)

    print(json.dumps(value, default=default, indent=2, ensure_ascii=False))


def _console():
    from rich.console import Console

    return Console(highlight=False)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def split_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`model:adapter` -> (model, adapter); a bare name -> (None, name)."""
    if ":" in spec:
        model, _, adapter = spec.partition(":")
        return model, adapter
    return None, spec


def find_adapter(store, spec: str, model: str | None = None):
    """Resolve an adapter given as `model:adapter`, or a name unique across all models."""
    from hyprstream_tui.errors import InvalidInput, NotFound

    spec_model, ref = split_adapter_spec(spec)
    model = spec_model or model
    if model:
        return store.resolve_adapter(model, ref)
    matches = []
    for summary in store.list_models():
        try:
            matches.append(store.resolve_adapter(summary.name, ref))
        except NotFound:
            continue
    if not matches:
        raise NotFound(f"No adapter {ref!r} in any model: see `hyprstream lora list`.")
    if len(matches) > 1:
        models = ", ".join(m.model for m in matches)
        raise InvalidInput(f"Adapter {ref!r} exists in several models ({models}): write it as MODEL:{ref}.")
    return matches[0]


class ByteProgress:
    """A rich progress bar fed with store/hub progress events (done/total bytes)."""

    def __init__(self, description: str) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), transient=False, disable=not sys.stderr.isatty(),
                                 console=__import__("rich.console").console.Console(stderr=True))
        self.task = self.progress.add_task(description, total=None)

    def __enter__(self) -> "ByteProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: Any) -> None:
        if hasattr(event, "bytes_total"):  # hub download: whole-pull bytes, file i of n
            name = f"{event.relpath[-30:]} ({event.index}/{event.count})"
            self.progress.update(self.task, completed=event.bytes_done, total=event.bytes_total or None, description=name)
            return
        self.progress.update(self.task, completed=event.done, total=event.total or None, description=event.file[-40:])


# ---- models -------------------------------------------------------------------------------------
def add_model_commands(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="pull, import, list, inspect and remove models")
    msub = model.add_subparsers(dest="model_cmd", required=True, metavar="COMMAND")

    p = msub.add_parser("list", help="models in the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_model_list)

    p = msub.add_parser("info", help="config, files, LFS objects, branches, tags and commits of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_info)

    p = msub.add_parser("import", help="import a local model folder (config.json + *.safetensors)")
    p.add_argument("dir", type=Path)
    p.add_argument("--name", help="store name (default: the folder's name)")
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


def cmd_model_list(args: argparse.Namespace) -> int:
    models = _store(args).list_models()
    if args.json:
        _print_json(models)
        return 0
    if not models:
        print("No models yet: `hyprstream model pull ORG/NAME`, `hyprstream model import DIR`, or open `hyprstream` for the demo.")
        return 0
    from rich.table import Table

    table = Table("name", "architecture", "params", "dtype", "size", "adapters", "commit", box=None)
    for m in models:
        table.add_row(m.name, m.architecture, human_count(m.parameters), m.dtype, human_size(m.size_bytes),
                      str(m.adapters), m.head[:7])
    _console().print(table)
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    info = _store(args).model_info(args.name)
    if args.json:
        _print_json(info)
        return 0
    s = info.summary
    out = _console()
    out.print(f"[bold]{s.name}[/]  {s.architecture}  {human_count(s.parameters)} params  {s.dtype}  {human_size(s.size_bytes)} on disk")
    out.print(f"source: {s.source}   main: {s.head[:12]}")
    out.print("config: " + ", ".join(f"{k}={v}" for k, v in info.config.items()))
    out.print("files:")
    for f in info.files:
        lfs = f"lfs {f.oid[:12]}" + ("" if f.present else " MISSING") if f.lfs else "git"
        out.print(f"  {f.path:<40} {human_size(f.size):>10}  {lfs}")
    out.print("adapters: " + (", ".join(f"{a.name} ({a.branch}, {a.tip[:7]})" for a in info.adapters) or "none"))
    out.print("tags: " + (", ".join(info.tags) or "none"))
    out.print("last commits on main:")
    for c in info.commits:
        out.print(f"  {c.short} {c.summary}")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    with ByteProgress("importing") as bar:
        summary = _store(args).import_model(args.dir, name=args.name, link=args.link, allow_pickle=args.allow_pickle,
                                            progress=bar)
    print(f"Imported {summary.name}: {summary.architecture}, {human_count(summary.parameters)} params, "
          f"{human_size(summary.size_bytes)} on disk, commit {summary.head[:7]}")
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    with ByteProgress(f"pulling {args.repo_id}") as bar:
        summary = _store(args).pull_model(args.repo_id, name=args.name, revision=args.revision,
                                          allow_pickle=args.allow_pickle, token=args.token, progress=bar)
    print(f"Pulled {args.repo_id} as {summary.name}: {human_count(summary.parameters)} params, "
          f"{human_size(summary.size_bytes)} on disk, commit {summary.head[:7]}")
    return 0


def cmd_model_rm(args: argparse.Namespace) -> int:
    store = _store(args)
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


# ---- adapters -----------------------------------------------------------------------------------
def add_lora_commands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
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


def cmd_lora_create(args: argparse.Namespace) -> int:
    store = _store(args)
    targets = [t for t in args.target_modules.split(",") if t.strip()]
    info = store.create_adapter(args.base_model, args.name, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                target_modules=targets)
    if args.json:
        _print_json(info)
    else:
        print(f"Created adapter {info.name} on {info.model}: branch {info.branch}, commit {info.tip[:7]}, worktree {info.worktree}")
    return 0


def cmd_lora_list(args: argparse.Namespace) -> int:
    store = _store(args)
    models = [args.model] if args.model else [m.name for m in store.list_models()]
    rows = [a for m in models for a in store.list_adapters(m)]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("No adapters yet: `hyprstream lora create --name NAME --base-model MODEL`.")
        return 0
    from rich.table import Table

    table = Table("model", "name", "branch", "tip", box=None)
    for a in rows:
        table.add_row(a.model, a.name, a.branch, a.tip[:7])
    _console().print(table)
    return 0


def cmd_lora_log(args: argparse.Namespace) -> int:
    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    commits = store.log(adapter.model, adapter.uuid, args.limit)
    if args.json:
        _print_json(commits)
        return 0
    for c in commits:
        metrics = "  ".join(f"{k}={v}" for k, v in c.metrics.items() if k in ("loss", "lr", "samples", "tokens"))
        tags = f"  ({', '.join(c.tags)})" if c.tags else ""
        print(f"{c.short}  {c.summary:<40} {metrics}{tags}")
    return 0


def cmd_lora_tag(args: argparse.Namespace) -> int:
    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    tag = store.tag(adapter.model, adapter.uuid, args.label, commit=args.commit, force=args.force)
    print(f"Tagged {tag}.")
    return 0


def cmd_lora_rollback(args: argparse.Namespace) -> int:
    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    info = store.rollback(adapter.model, adapter.uuid, args.target)
    print(f"{info.summary}: new commit {info.short} on {adapter.branch} (history kept).")
    return 0


# ---- training (issue 4) -------------------------------------------------------------------------
def add_train_commands(lora_sub: argparse._SubParsersAction) -> None:
    """Registered by the training work; absent verbs simply don't appear."""


# ---- inference (issue 3) ------------------------------------------------------------------------
def add_infer_commands(sub: argparse._SubParsersAction) -> None:
    """Registered by the engine work."""


# ---- server (issue 6) ---------------------------------------------------------------------------
def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    """Registered by the server work."""


# ---- TUI (issue 5) ------------------------------------------------------------------------------
def add_tui_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tui", help="open the terminal workstation (the default)")
    p.add_argument("--remote", default=None, help="use a hyprstream/OpenAI server at URL for chat")
    p.set_defaults(func=cmd_tui)


def cmd_tui(args: argparse.Namespace) -> int:
    try:
        from hyprstream_tui.tui.app import run_app
    except ImportError:
        print("The TUI is not built yet in this version: use the CLI verbs (`hyprstream --help`).", file=sys.stderr)
        return 2
    return run_app(home=args.home, remote=getattr(args, "remote", None))


# ---- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyprstream",
        description="A terminal workstation for local LLMs: models as git repositories, LoRA adapters as branches, "
                    "checkpoints as commits. Without a command it opens the TUI.",
    )
    parser.add_argument("--version", action="version", version=f"hyprstream {__version__}")
    parser.add_argument("--home", default=None, help="data folder (default: $HYPRSTREAM_HOME or ~/.cache/hyprstream)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_model_commands(sub)
    lora_sub = add_lora_commands(sub)
    add_train_commands(lora_sub)
    add_infer_commands(sub)
    add_serve_commands(sub)
    add_tui_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args.func = cmd_tui
    try:
        return int(args.func(args) or 0)
    except HyprError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; what was complete is kept.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
