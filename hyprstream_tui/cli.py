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
    model = spec_model if spec_model is not None else model
    if model is not None:  # given, even empty: the store says what is wrong with it
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

    p = msub.add_parser("import", help="import a local model folder (config.json + *.safetensors) or a .gguf file")
    p.add_argument("dir", type=Path, metavar="PATH", help="a Hugging Face model folder, or a GGUF file (llama.cpp, Ollama, LM Studio)")
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
    from hyprstream_tui.engine.gguf import import_gguf, is_gguf

    path = args.dir.expanduser()
    if is_gguf(path):
        with ByteProgress("importing") as bar:
            summary = import_gguf(_store(args), path, name=args.name, progress=bar)
        print(f"Imported {summary.name}: {summary.architecture}, {human_count(summary.parameters)} params, "
              f"{summary.dtype}, {human_size(summary.size_bytes)} on disk, commit {summary.head[:7]}")
        return 0
    with ByteProgress("importing") as bar:
        summary = _store(args).import_model(path, name=args.name, link=args.link, allow_pickle=args.allow_pickle,
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
    models = [args.model] if args.model is not None else [m.name for m in store.list_models()]
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


# ---- training ------------------------------------------------------------------------------------
# (option, argparse kwargs): shared by the parser and by `--detach`, which re-runs the same command.
TRAIN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--learning-rate", dict(type=float, help="peak learning rate (default: from the model's width and depth and "
                                               "the adapter's alpha and targets)")),
    ("--batch-size", dict(type=int, help="samples per step (default 4)")),
    ("--steps", dict(type=int, help="steps in this run (default: 3 epochs, at least 60 steps)")),
    ("--epochs", dict(type=float, help="passes over the samples in this run")),
    ("--checkpoint-every", dict(type=int, help="commit a checkpoint every K steps (default 50)")),
    ("--max-seq-len", dict(type=int, help="tokens per sample, longer ones are cut (default 512)")),
    ("--warmup-steps", dict(type=int, help="linear warm-up steps (default 10%% of the run, at most 100)")),
    ("--min-lr-ratio", dict(type=float, help="cosine decay ends at lr x this (default 0.1)")),
    ("--weight-decay", dict(type=float, help="AdamW weight decay (default 0)")),
    ("--grad-clip", dict(type=float, help="clip the gradient norm to this, 0 = off (default 1.0)")),
    ("--seed", dict(type=int, help="data order and LoRA initialisation (default 0)")),
    ("--device", dict(help="cpu, cuda, cuda:N or mps (default cpu)")),
    ("--dtype", dict(choices=("auto", "float32", "bfloat16", "float16"), help="base model dtype (default: the checkpoint's)")),
)
TRAIN_FLAGS = (
    ("--tag-best", "tag the lowest-loss checkpoint <adapter>/best"),
    ("--new-run", "start a new schedule even if the last run was stopped part-way"),
)


def add_train_commands(lora_sub: argparse._SubParsersAction) -> None:
    train = lora_sub.add_parser("train", help="add samples, train, follow and stop training")
    tsub = train.add_subparsers(dest="train_cmd", required=True, metavar="COMMAND")

    p = tsub.add_parser("sample", help="add samples to an adapter (committed on its branch)")
    _adapter_arg(p)
    p.add_argument("--input", help="the prompt")
    p.add_argument("--output", help="the answer to learn")
    p.add_argument("--system", help="optional system prompt for --input/--output")
    p.add_argument("--file", type=Path, help="JSONL rows: {input, output} or {messages: [...]}")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_sample)

    p = tsub.add_parser("start", help="train (resumes the branch's last checkpoint)")
    _adapter_arg(p)
    for option, kwargs in TRAIN_OPTIONS:
        p.add_argument(option, default=None, **kwargs)
    for option, text in TRAIN_FLAGS:
        p.add_argument(option, action="store_true", help=text)
    p.add_argument("--detach", action="store_true", help="train in the background and return at once")
    p.set_defaults(func=cmd_train_start)

    p = tsub.add_parser("status", help="is it training, step, loss, tokens/s, ETA, last checkpoint")
    _adapter_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_status)

    p = tsub.add_parser("stop", help="finish the current step, commit a checkpoint and stop")
    _adapter_arg(p)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for it to finish (default 120)")
    p.add_argument("--no-wait", action="store_true", help="ask and return at once")
    p.set_defaults(func=cmd_train_stop)

    p = lora_sub.add_parser("export", help="write an adapter as one .safetensors file or a PEFT folder")
    _adapter_arg(p)
    p.add_argument("--output", "-o", type=Path, required=True, help="FILE.safetensors, or DIR with --format peft")
    p.add_argument("--format", choices=("safetensors", "peft"), default="safetensors")
    p.add_argument("--commit", help="commit, tag or step:N (default: the tip)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_lora_export)

    p = lora_sub.add_parser("merge", help="merge an adapter into its base as a new model repository")
    _adapter_arg(p)
    p.add_argument("--name", dest="new_name", required=True, help="name of the new model")
    p.add_argument("--commit", help="commit, tag or step:N (default: the tip)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.set_defaults(func=cmd_lora_merge)


def _adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="ADAPTER or MODEL:ADAPTER")
    p.add_argument("--model", help="the base model, when the adapter name is not unique")


def _train_config(args: argparse.Namespace):
    """The TrainConfig from the options given, and the names of those given (a resumed run keeps
    its own values for the rest)."""
    from hyprstream_tui.engine.train.config import TrainConfig

    given = {opt[2:].replace("-", "_"): getattr(args, opt[2:].replace("-", "_")) for opt, _ in TRAIN_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    flags = {opt[2:].replace("-", "_"): True for opt, _ in TRAIN_FLAGS if getattr(args, opt[2:].replace("-", "_"))}
    return TrainConfig(**given, **flags), frozenset(given)


def cmd_train_sample(args: argparse.Namespace) -> int:
    from hyprstream_tui.engine.train.samples import add_samples, rows_from_file
    from hyprstream_tui.errors import InvalidInput

    if args.file is not None and (args.input is not None or args.output is not None or args.system is not None):
        raise InvalidInput("Give --file, or --input with --output (and --system), not both.")
    if args.file is None and (args.input is None or args.output is None):
        raise InvalidInput("Give --input TEXT and --output TEXT (or --file F.jsonl).")
    if args.file is not None:
        rows = rows_from_file(args.file)
    else:
        rows = [{"input": args.input, "output": args.output, **({"system": args.system} if args.system else {})}]
    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    commit, total = add_samples(store, adapter.model, adapter.uuid, rows)
    if args.json:
        _print_json({"adapter": adapter.name, "model": adapter.model, "added": len(rows), "samples": total,
                     "commit": commit.sha})
    else:
        print(f"Added {len(rows)} sample{'s' if len(rows) != 1 else ''} to {adapter.name} ({total} in all): "
              f"commit {commit.short}")
    return 0


def cmd_train_start(args: argparse.Namespace) -> int:
    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    config, explicit = _train_config(args)
    if args.detach:
        return _train_detached(args, store, adapter)
    import signal
    import threading

    from hyprstream_tui.engine.train.job import TrainJob

    cancel = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if cancel.is_set():  # a second Ctrl-C: stop now, the last checkpoint stays the tip
            raise KeyboardInterrupt
        cancel.set()
        print("\nStopping: finishing this step and committing a checkpoint (Ctrl-C again to abort).", file=sys.stderr)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with TrainView(adapter.name) as view:
            result = TrainJob(store, adapter.model, adapter.uuid, config, on_event=view, cancel=cancel,
                              explicit=explicit).run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    how = "Stopped" if result.stopped else "Finished"
    print(f"{how} {adapter.name} at step {result.step}: checkpoint {result.commit[:7]} on {adapter.branch}.")
    return 0


class TrainView:
    """The job's events as a rich progress bar (step, loss, lr, tokens/s, ETA) on a terminal, or
    as plain lines (start, checkpoints) otherwise."""

    def __init__(self, name: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  ETA {task.fields[eta]}"),
            TimeElapsedColumn(), console=self.console, disable=not self.live)
        self.task = self.progress.add_task(name, total=None, loss="-", lr="-", tps="-", eta="-")

    def __enter__(self) -> "TrainView":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def say(self, text: str) -> None:
        if self.live:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def __call__(self, event: Any) -> None:
        from hyprstream_tui.engine.train import job

        if isinstance(event, job.TrainStarted):
            how = "Resuming" if event.resumed else "Training"
            lr = f", peak lr {event.learning_rate:.2g}" if event.learning_rate is not None else ""
            self.say(f"{how} {event.adapter} on {event.model} from step {event.step} to {event.target} "
                     f"({event.samples} samples{lr}).")
            self.progress.update(self.task, completed=event.step, total=event.target)
        elif isinstance(event, job.TrainStep):
            self.progress.update(self.task, completed=event.step, total=event.target, loss=f"{event.loss:.4f}",
                                 lr=f"{event.lr:.2e}", tps=f"{event.tokens_per_s:,.0f}", eta=job.eta_text(event.eta_s))
        elif isinstance(event, job.CheckpointCommitted):
            loss = f", loss {event.loss:.4f}" if event.loss is not None else ""
            tags = f" (tagged {', '.join(event.tags)})" if event.tags else ""
            self.say(f"Checkpoint at step {event.step}{loss}: commit {event.commit[:7]}{tags}")


def _train_detached(args: argparse.Namespace, store, adapter) -> int:
    """Re-run this `train start` in a new session, its output in a log file; return once it holds
    the adapter's train lock (or report why it stopped)."""
    import subprocess
    import time

    from hyprstream_tui.engine.train.samples import read_rows
    from hyprstream_tui.errors import Conflict, HyprError, InvalidInput
    from hyprstream_tui.store.locks import is_locked

    lock = store.train_lock_path(adapter.model, adapter.uuid)
    if is_locked(lock):
        raise Conflict(f"Adapter {adapter.name!r} of {adapter.model!r} is training already: follow it with "
                       f"`hyprstream lora train status {adapter.name}`.")
    if not read_rows(store, adapter.model, adapter.tip):
        raise InvalidInput(f"Adapter {adapter.name!r} has no samples yet: add some with `hyprstream lora train sample`.")
    argv = [sys.executable, "-m", "hyprstream_tui", "--home", str(store.paths.home), "lora", "train", "start",
            f"{adapter.model}:{adapter.uuid}"]
    for option, _ in TRAIN_OPTIONS:
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            argv += [option, str(value)]
    argv += [option for option, _ in TRAIN_FLAGS if getattr(args, option[2:].replace("-", "_"))]
    log_path = store.paths.home / "logs" / f"train-{adapter.model}-{adapter.uuid}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    deadline = time.monotonic() + 60
    while not is_locked(lock) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None and not is_locked(lock):
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
        raise HyprError(f"Training did not start: {last} (log: {log_path}).")
    print(f"Training {adapter.name} in the background (pid {proc.pid}). Follow it with "
          f"`hyprstream lora train status {adapter.name}`, stop it with `hyprstream lora train stop {adapter.name}`. "
          f"Log: {log_path}")
    return 0


def cmd_train_status(args: argparse.Namespace) -> int:
    from hyprstream_tui.engine.train.job import eta_text, train_status

    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    st = train_status(store, adapter.model, adapter.uuid)
    if args.json:
        _print_json(st)
        return 0
    last = (f"last checkpoint {st.last_checkpoint[:7]} (step {st.last_checkpoint_step})" if st.last_checkpoint
            else "no checkpoint yet")
    if not st.running:
        loss = f", loss {st.loss:.4f}" if st.loss is not None else ""
        print(f"{st.adapter} ({st.model}): not training; {last}{loss}.")
        return 0
    parts = [f"{st.adapter} ({st.model}): {st.state}, pid {st.pid}"]
    if st.step is not None:
        parts.append(f"step {st.step}/{st.target}")
    if st.loss is not None:
        parts.append(f"loss {st.loss:.4f}  lr {st.lr:.2e}  {st.tokens_per_s:,.0f} tok/s  ETA {eta_text(st.eta_s)}")
    parts.append(last)
    print(", ".join(parts))
    return 0


def cmd_train_stop(args: argparse.Namespace) -> int:
    from hyprstream_tui.engine.train.job import request_stop, train_status

    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    if not request_stop(store, adapter.model, adapter.uuid, wait=0 if args.no_wait else args.timeout):
        print(f"Asked {adapter.name} to stop: it commits a checkpoint after its current step.")
        return 0 if args.no_wait else 1
    st = train_status(store, adapter.model, adapter.uuid)
    where = f"checkpoint {st.last_checkpoint[:7]} at step {st.last_checkpoint_step}" if st.last_checkpoint else "no checkpoint"
    print(f"Stopped {adapter.name}: {where}.")
    return 0


def cmd_lora_export(args: argparse.Namespace) -> int:
    from hyprstream_tui.engine.train.export import export_adapter

    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    result = export_adapter(store, adapter.model, adapter.uuid, args.output, fmt=args.format, rev=args.commit,
                            force=args.force)
    print(f"Exported {adapter.name} at {result.commit[:7]} to {result.path} ({args.format}, {human_size(result.size)}).")
    return 0


def cmd_lora_merge(args: argparse.Namespace) -> int:
    from hyprstream_tui.engine.train.export import merge_adapter

    store = _store(args)
    adapter = find_adapter(store, args.name, args.model)
    summary = merge_adapter(store, adapter.model, adapter.uuid, args.new_name,
                            rev=args.commit, dtype=args.dtype)
    print(f"Merged {adapter.name} into a new model {summary.name}: {human_count(summary.parameters)} params, "
          f"commit {summary.head[:7]}.")
    return 0


# ---- inference -----------------------------------------------------------------------------------
def add_infer_commands(sub: argparse._SubParsersAction) -> None:
    """`infer` and `chat`: their parsers and handlers live beside the engine (no torch at import)."""
    from hyprstream_tui.engine.cli_support import add_infer_commands as add

    add(sub)


# ---- server --------------------------------------------------------------------------------------
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
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8 weights (CPU; base models only): batches scale best with it on CPUs without native bf16")
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

    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions
    from hyprstream_tui.server.app import create_app

    engine = Engine(store=_store(args), max_models=args.max_models, threads=args.threads,
                    options=LoadOptions(dtype=args.dtype, quantize=args.quantize))
    app = create_app(engine, api_key=api_key, max_queue=args.max_queue, max_batch=args.max_batch,
                     bind=args.host, allowed_hosts=args.allowed_host)
    print(f"hyprstream serving on http://{args.host}:{args.port}/v1 (OpenAPI at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


# ---- TUI -----------------------------------------------------------------------------------------
def add_tui_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tui", help="open the terminal workstation (the default)")
    p.add_argument("--remote", default=None, help="use a hyprstream/OpenAI server at URL for chat")
    p.set_defaults(func=cmd_tui)


def cmd_tui(args: argparse.Namespace) -> int:
    from hyprstream_tui.tui.app import run_app

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
    from hyprstream_tui import _sigint

    previous = _sigint.during_start_up()  # Ctrl-C while parsing: one line and out (nothing written yet)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    finally:
        _sigint.restore(previous)
    if args.command is None:
        args.func = cmd_tui
    try:
        with _sigint.redelivered():
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
    except Exception as exc:  # a full disk is never a bug, wherever a library reported it
        from hyprstream_tui.errors import StorageError, is_disk_full

        if _sigint.caused_by_interrupt(exc) and not args.debug:  # a Ctrl-C that a library wrapped
            print("error: interrupted; what was complete is kept.", file=sys.stderr)
            return 130

        if args.debug or not is_disk_full(exc):
            raise
        print(f"error: Not enough disk space for `hyprstream {args.command}`: free some space and try again "
              "(what was committed before is kept).", file=sys.stderr)
        return StorageError.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
