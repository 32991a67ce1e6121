"""One rank's view of a training group (torch.distributed), for the Trainer in loop.py.

Only the ranks import this (engine/train/rank.py), never the launcher or the TUI. Backend: NCCL
when the rank trains on a CUDA device, gloo otherwise. Two process groups: the default one, with
a long timeout (`SETUP_TIMEOUT_S`), covers loading (a slow rank may take minutes to load a big base
model); the step group, with a short one (`HYPRSTREAM_DIST_TIMEOUT`, default `STEP_TIMEOUT_S`),
carries every per-step collective, so a rank that hangs (rather than dies) ends the group within
that bound. A rank that dies closes its sockets: the others fail at their next collective at once,
and the elastic agent ends them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Sequence

from hyprstream_tui.errors import InvalidInput

if TYPE_CHECKING:
    import torch

SETUP_TIMEOUT_S = 900.0
STEP_TIMEOUT_S = 60.0
STATS = ("loss", "tokens", "seconds", "stop", "pid")  # what every rank reports after each step


@dataclass(frozen=True)
class RankStats:
    rank: int
    loss: float  # this rank's share of the global mean loss
    tokens: int
    seconds: float
    stop: bool
    pid: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class Group:
    """The process group of this rank, and the few collectives the trainer needs."""

    def __init__(self, *, rank: int, world: int, local_rank: int, device: str, step_group: Any) -> None:
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.device = device
        self._pg = step_group

    @classmethod
    def join(cls, device: str) -> Group:
        """Join the group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_*).
        `device` "cuda" becomes this rank's own GPU (cuda:LOCAL_RANK) and selects NCCL."""
        import torch
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "gloo"
        if device.startswith("cuda"):
            if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
                raise InvalidInput(f"`device` cuda needs a GPU per process: this host has "
                                   f"{torch.cuda.device_count()}, rank {rank} wants GPU {local_rank}.")
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        dist.init_process_group(backend, timeout=timedelta(seconds=SETUP_TIMEOUT_S))
        step_s = float(os.environ.get("HYPRSTREAM_DIST_TIMEOUT", STEP_TIMEOUT_S))
        step_group = dist.new_group(backend=backend, timeout=timedelta(seconds=step_s))
        return cls(rank=rank, world=world, local_rank=local_rank, device=device, step_group=step_group)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- collectives -------------------------------------------------------------------------------
    def _tensor(self, values: Sequence[float], dtype: Any) -> torch.Tensor:
        import torch

        return torch.tensor(list(values), dtype=dtype, device=self.device)

    def agree_min(self, n: int, *, setup: bool = False) -> int:
        """The smallest `n` over the ranks (rows are append-only, so the first n agree everywhere)."""
        import torch
        import torch.distributed as dist

        t = self._tensor([n], torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=None if setup else self._pg)
        return int(t.item())

    def sum_ints(self, *values: int) -> list[int]:
        import torch
        import torch.distributed as dist

        t = self._tensor(values, torch.long)
        dist.all_reduce(t, group=self._pg)
        return [int(x) for x in t.tolist()]

    def gather_stats(self, *, loss: float, tokens: int, seconds: float, stop: bool) -> list[RankStats]:
        import torch
        import torch.distributed as dist

        mine = self._tensor([loss, tokens, seconds, float(stop), os.getpid()], torch.float64)
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(rows, mine, group=self._pg)
        return [RankStats(rank=i, loss=r[0].item(), tokens=int(r[1].item()), seconds=r[2].item(),
                          stop=bool(r[3].item()), pid=int(r[4].item())) for i, r in enumerate(rows)]

    def all_text(self, text: str) -> list[str]:
        """Every rank's `text` (setup only: the branch tip each host trains from)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, text)
        return [str(x) for x in out]

    def wrap(self, model: Any, params: Sequence[Any]) -> Any:
        """`model` under DDP over its trainable parameters, which start from rank 0's values (the
        frozen base is loaded alike everywhere and never synchronised: no broadcast of the base)."""
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        for p in params:
            dist.broadcast(p.data, src=0)
        device_ids = [self.local_rank] if self.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self._pg, init_sync=False)
