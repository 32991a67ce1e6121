"""`hyprstream lora train sample | start | status | stop`: samples in, checkpoints out.

`start` trains in this process with a progress view (Ctrl-C stops after the step and commits), or
with `--detach` re-runs itself in the background with its output in a log file. With `--nproc N`
(and `--nnodes`...) it launches a group of processes under torch.distributed and stays the process
the user sees (engine/train/distributed.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

from hyprstream_tui import units
from hyprstream_tui.cli.common import adapter_arg, find_adapter, path_arg, print_json, store_from

if TYPE_CHECKING:
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.store.store import Store
    from hyprstream_tui.store.types import AdapterInfo

# (option, argparse kwargs): shared by the parser and by `--detach`, which re-runs the same command.
# Each option is a TrainConfig field (`--learning-rate` is `learning_rate`).
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
    ("--nproc", dict(type=int, help="training processes on this host, under torch.distributed (default 1); "
                                    "--batch-size is per process")),
)
# Where a group's other hosts are (engine/train/distributed.py's Launch): not TrainConfig fields.
LAUNCH_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--nnodes", dict(type=int, help="hosts training together (default 1), each running this command")),
    ("--node-rank", dict(type=int, help="this host's index, 0 to nnodes-1 (default 0)")),
    ("--master-addr", dict(help="address of the host with node rank 0 (needed with --nnodes > 1)")),
    ("--master-port", dict(type=int, help="free TCP port on that host (default: a free one, 29500 across hosts)")),
)
TRAIN_FLAGS = (
    ("--tag-best", "tag the lowest-loss checkpoint <adapter>/best"),
    ("--new-run", "start a new schedule even if the last run was stopped part-way"),
)


def add_train_commands(lora_sub: argparse._SubParsersAction) -> None:
    train = lora_sub.add_parser("train", help="add samples, train, follow and stop training")
    tsub = train.add_subparsers(dest="train_cmd", required=True, metavar="COMMAND")

    p = tsub.add_parser("sample", help="add samples to an adapter (committed on its branch)")
    adapter_arg(p)
    p.add_argument("--input", help="the prompt")
    p.add_argument("--output", help="the answer to learn")
    p.add_argument("--system", help="optional system prompt for --input/--output")
    p.add_argument("--file", type=path_arg, help="JSONL rows: {input, output} or {messages: [...]}")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_sample)

    p = tsub.add_parser("start", help="train (resumes the branch's last checkpoint)")
    adapter_arg(p)
    for option, kwargs in TRAIN_OPTIONS:
        p.add_argument(option, default=None, **kwargs)
    for option, text in TRAIN_FLAGS:
        p.add_argument(option, action="store_true", help=text)
    for option, kwargs in LAUNCH_OPTIONS:
        p.add_argument(option, default=None, **kwargs)
    p.add_argument("--detach", action="store_true", help="train in the background and return at once")
    p.set_defaults(func=cmd_train_start)

    p = tsub.add_parser("status", help="is it training, step, loss, tokens/s, ETA, last checkpoint")
    adapter_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_status)

    p = tsub.add_parser("stop", help="finish the current step, commit a checkpoint and stop")
    adapter_arg(p)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for it to finish (default 120)")
    p.add_argument("--no-wait", action="store_true", help="ask and return at once")
    p.set_defaults(func=cmd_train_stop)


def setting_of(option: str) -> str:
    """`--learning-rate` -> `learning_rate`: the TrainConfig field (and argparse dest) of an option."""
    return option[2:].replace("-", "_")


def train_config(args: argparse.Namespace) -> tuple[TrainConfig, frozenset[str]]:
    """The TrainConfig from the options given, and the names of those given (a resumed run keeps
    its own values for the rest)."""
    from hyprstream_tui.engine.train.config import TrainConfig

    given = {setting_of(opt): getattr(args, setting_of(opt)) for opt, _ in TRAIN_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    flags = {setting_of(opt): True for opt, _ in TRAIN_FLAGS if getattr(args, setting_of(opt))}
    values: dict[str, Any] = {**given, **flags}
    return TrainConfig(**values), frozenset(given)


def launch_of(args: argparse.Namespace, config: TrainConfig) -> Any:
    from hyprstream_tui.engine.train.distributed import Launch

    given = {setting_of(opt): getattr(args, setting_of(opt)) for opt, _ in LAUNCH_OPTIONS}
    return Launch(nproc=config.nproc, **{k: v for k, v in given.items() if v is not None})


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
    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    commit, total = add_samples(store, adapter.model, adapter.uuid, rows)
    if args.json:
        print_json({"adapter": adapter.name, "model": adapter.model, "added": len(rows), "samples": total,
                    "commit": commit.sha})
    else:
        print(f"Added {len(rows)} sample{'s' if len(rows) != 1 else ''} to {adapter.name} ({total} in all): "
              f"commit {commit.short}")
    return 0


def cmd_train_start(args: argparse.Namespace) -> int:
    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    config, explicit = train_config(args)
    launch = launch_of(args, config)
    if args.detach:
        return train_detached(args, store, adapter)
    import signal
    import threading

    from hyprstream_tui.engine.train.distributed import make_job

    cancel = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if cancel.is_set():  # a second Ctrl-C: stop now, the last checkpoint stays the tip
            raise KeyboardInterrupt
        cancel.set()
        print("\nStopping: finishing this step and committing a checkpoint (Ctrl-C again to abort).", file=sys.stderr)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with TrainView(adapter.name) as view:
            result = make_job(store, adapter.model, adapter.uuid, config, launch=launch, on_event=view, cancel=cancel,
                              explicit=explicit).run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    how = "Stopped" if result.stopped else "Finished"
    if launch.node_rank > 0:  # rank 0's host commits; this one only lent its processes
        print(f"{how} {adapter.name} at step {result.step}: the checkpoints are committed on the host with node rank 0.")
        return 0
    print(f"{how} {adapter.name} at step {result.step}: checkpoint {result.commit[:7]} on {adapter.branch}.")
    return 0


class TrainView:
    """The job's events as a rich progress bar (step, loss, lr, tokens/s, ETA) on a terminal, or
    as plain lines (start, checkpoints) otherwise."""

    def __init__(self, name: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from hyprstream_tui.cli.progress import ElapsedColumn

        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  ETA {task.fields[eta]}"),
            ElapsedColumn(), console=self.console, disable=not self.live)
        self.task = self.progress.add_task(name, total=None, loss="-", lr="-", tps="-", eta="-")

    def __enter__(self) -> TrainView:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)

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
            group = (f", {event.processes} processes x batch {event.batch_size}" if event.processes > 1 else "")
            self.say(f"{how} {event.adapter} on {event.model} from step {event.step} to {event.target} "
                     f"({event.samples} samples{lr}{group}).")
            self.progress.update(self.task, completed=event.step, total=event.target)
        elif isinstance(event, job.TrainStep):
            self.progress.update(self.task, completed=event.step, total=event.target, loss=f"{event.loss:.4f}",
                                 lr=f"{event.lr:.2e}", tps=f"{event.tokens_per_s:,.0f}", eta=units.eta(event.eta_s))
        elif isinstance(event, job.CheckpointCommitted):
            loss = f", loss {event.loss:.4f}" if event.loss is not None else ""
            tags = f" (tagged {', '.join(event.tags)})" if event.tags else ""
            self.say(f"Checkpoint at step {event.step}{loss}: commit {event.commit[:7]}{tags}")


def train_detached(args: argparse.Namespace, store: Store, adapter: AdapterInfo) -> int:
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
    for option, _ in TRAIN_OPTIONS + LAUNCH_OPTIONS:
        value = getattr(args, setting_of(option))
        if value is not None:
            argv += [option, str(value)]
    argv += [option for option, _ in TRAIN_FLAGS if getattr(args, setting_of(option))]
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
    from hyprstream_tui.engine.train.job import train_status

    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    st = train_status(store, adapter.model, adapter.uuid)
    if args.json:
        print_json(st)
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
        parts.append(f"loss {st.loss:.4f}  lr {st.lr:.2e}  {st.tokens_per_s:,.0f} tok/s  ETA {units.eta(st.eta_s)}")
    if st.ranks:
        each = ", ".join(f"rank {r['rank']} {r['tokens_per_s']:,.0f} tok/s" for r in st.ranks)
        parts.append(f"{st.processes} processes ({each}; summed above)")
    elif st.processes:
        parts.append(f"{st.processes} processes starting")
    parts.append(last)
    print(", ".join(parts))
    return 0


def cmd_train_stop(args: argparse.Namespace) -> int:
    from hyprstream_tui.engine.train.job import request_stop, train_status

    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    if not request_stop(store, adapter.model, adapter.uuid, wait=0 if args.no_wait else args.timeout):
        print(f"Asked {adapter.name} to stop: it commits a checkpoint after its current step.")
        return 0 if args.no_wait else 1
    st = train_status(store, adapter.model, adapter.uuid)
    where = f"checkpoint {st.last_checkpoint[:7]} at step {st.last_checkpoint_step}" if st.last_checkpoint else "no checkpoint"
    print(f"Stopped {adapter.name}: {where}.")
    return 0
