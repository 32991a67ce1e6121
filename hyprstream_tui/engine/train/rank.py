"""One rank of a training group, as torchrun starts it (see distributed.py for the whole picture):

    python -m torch.distributed.run ... -m hyprstream_tui.engine.train.rank SPEC_JSON

It runs TrainJob's own loop (the same events, checkpoints and stop rule) on a Trainer in group
mode. Rank 0 commits; every other rank only reads the worktree and the base model, and never opens
the store. Every rank connects to its host's launcher over the control socket (its pid out, a stop
request in); the host's local rank 0 also sends the events and status lines. Ctrl-C is the launcher's alone (the ranks ignore SIGINT).
A rank's failure is written to stderr (the group's log) as one line the launcher can quote.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hyprstream_tui.engine.train.config import TrainConfig
from hyprstream_tui.engine.train.distributed import KEY_ENV, RANK_ERROR
from hyprstream_tui.engine.train.job import TrainFinished, TrainJob
from hyprstream_tui.errors import HyprError, InvalidInput
from hyprstream_tui.store.types import AdapterInfo

if TYPE_CHECKING:
    from hyprstream_tui.engine.train.group import Group
    from hyprstream_tui.engine.train.loop import Trainer


class Link:
    """This host's launcher, seen from one rank; `lead` is the host's local rank 0, the one that
    reports events and status."""

    def __init__(self, address: str, key: bytes, *, rank: int, lead: bool) -> None:
        self.conn: Connection = Client(address, family="AF_UNIX", authkey=key)
        self.lead = lead
        self.stop = threading.Event()
        self.orphaned = False  # the launcher went away: it no longer holds the lock
        self._send_lock = threading.Lock()
        self.conn.send(("hello", rank, os.getpid(), lead))
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        try:
            while self.conn.recv()[0] != "stop":
                pass
        except (EOFError, OSError):
            self.orphaned = True
        self.stop.set()

    def send(self, *message: Any) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                self.orphaned = True
                self.stop.set()


class RankJob(TrainJob):
    """TrainJob's loop in one rank: no lock (the launcher holds it), no worktree reset (done
    before the ranks start), status lines to the launcher, and commits on rank 0 only."""

    def __init__(self, spec: dict[str, Any], config: TrainConfig, group: Group, link: Link) -> None:
        from hyprstream_tui.settings import Paths
        from hyprstream_tui.store import Store

        store = Store(Paths.from_env(spec["home"])) if group.rank == 0 else None  # the others never open it
        self.link, self.group, self.spec = link, group, spec
        super().__init__(cast(Any, store), spec["adapter"]["model"], spec["adapter"]["uuid"], config,
                         on_event=self._send_event, cancel=link.stop,
                         explicit=spec["explicit"])

    def _send_event(self, event: Any) -> None:
        if self.link.lead:
            self.link.send("event", event)

    def run(self) -> TrainFinished:
        return self._train(AdapterInfo(**self.spec["adapter"]))

    def _prepare(self, adapter: AdapterInfo) -> Trainer:
        from hyprstream_tui.engine.train.loop import Trainer

        tips = self.group.all_text(adapter.tip)
        if len(set(tips)) > 1:
            raise InvalidInput(f"The hosts train adapter {adapter.name!r} from different commits ({tips[0][:7]} on "
                               f"rank 0, {adapter.tip[:7]} here): bring every host's copy to rank 0's commit first.")
        self.trainer = trainer = Trainer(base_dir=Path(self.spec["base_dir"]), worktree=Path(self.spec["worktree"]),
                                         config=self.config, explicit=self.explicit, group=self.group)
        trainer.stop_wanted = self.cancel.is_set
        trainer.setup()
        return trainer

    def cancelled(self) -> bool:
        return self.trainer is not None and self.trainer.group_stop  # the ranks' vote, the same everywhere

    def _status(self, **info: Any) -> None:
        if self.link.lead:
            self.link.send("status", info)

    def _commits(self) -> bool:
        return self.group.rank == 0 and not self.link.orphaned


def peer_trouble(exc: BaseException) -> str:
    """A collective's failure in words (gloo says it with a source path); anything else as it is."""
    text = str(exc).strip()
    if "Timed out" in text or "timed out" in text:
        limit = os.environ.get("HYPRSTREAM_DIST_TIMEOUT", "60")
        return (f"no answer from the other ranks within the timeout ({limit} s, HYPRSTREAM_DIST_TIMEOUT): one "
                "of them hung or its host became unreachable")
    if any(k in text for k in ("Connection closed by peer", "Connection reset", "Broken pipe")):
        return "another rank went away (its connection closed)"
    first = text.splitlines()[0] if text else "no detail"
    return f"{type(exc).__name__}: {first}"


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = json.loads(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    link = None
    try:
        lead = int(os.environ.get("LOCAL_RANK", "0")) == 0
        link = Link(spec["control"], bytes.fromhex(os.environ[KEY_ENV]), rank=rank, lead=lead)
        config = TrainConfig(**spec["config"])
        from hyprstream_tui.engine.train.group import Group

        group = Group.join(config.device)
        RankJob(spec, config, group, link).run()
        group.close()
        return 0
    except HyprError as exc:
        if link is not None and link.lead:
            link.send("error", type(exc).__name__, exc.message)
        print(f"{RANK_ERROR}rank {rank}: {exc.message}", file=sys.stderr, flush=True)
        return 1
    except BaseException as exc:  # noqa: BLE001 - a peer gone, a bug: one line for the launcher
        print(f"{RANK_ERROR}rank {rank}: {peer_trouble(exc)}", file=sys.stderr, flush=True)
        import traceback

        traceback.print_exc()
        return 1  # no goodbye to a group with a rank gone: the process exits, its sockets close


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is written and committed: skip torch's seconds of interpreter teardown
