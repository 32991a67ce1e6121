"""What a checkpoint holds in the adapter's worktree, and reading it back. No pickle anywhere.

  adapter/adapter_model.safetensors   LoRA weights, PEFT key names (PeftModel.from_pretrained loads it)
  optimizer/state.safetensors         AdamW moments (`opt.<param>.<key>`), the torch RNG state, and
                                      in its metadata the run state (step, schedule, data position)
  metrics/steps.jsonl                 one line per step: step, loss, lr, tokens_per_s, time

Every file is written as a new file (temp name, fsync, `os.replace`): the previous version may be a
hard link into `.git/lfs/objects`, so it must never be opened for writing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyprstream_tui.store.atomic import write_bytes

if TYPE_CHECKING:  # torch and peft load when training starts
    import torch
    from peft import PeftModel

ADAPTER_FILE = "adapter/adapter_model.safetensors"
STATE_FILE = "optimizer/state.safetensors"
METRICS_FILE = "metrics/steps.jsonl"
STATE_FORMAT = 1


@dataclass(kw_only=True)
class RunState:
    """Where training stands. A run is one warm-up + decay schedule of `run_total` steps that
    began at global step `run_start`; `hparams` are the values that shaped it (config.RUN_KEYS)."""

    step: int = 0
    run_start: int = 0
    run_total: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    epoch: int = -1  # data passes started; -1 before the first
    epoch_size: int = 0  # rows in the current pass
    epoch_pos: int = 0  # rows of the current pass already used
    samples_seen: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # training seconds, over every start
    world_size: int = 1  # processes training it (the global batch is hparams["batch_size"] x world_size)

    @property
    def run_done(self) -> int:
        return self.step - self.run_start

    @property
    def unfinished(self) -> bool:
        return 0 < self.run_total and self.run_done < self.run_total

    def to_json(self) -> str:
        return json.dumps({"format": STATE_FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Saved:
    """A checkpoint read back from a worktree."""

    state: RunState
    optimizer: dict[int, dict[str, Any]]  # AdamW per-parameter state, by index
    param_names: list[str]
    rng: torch.Tensor | None  # torch's CPU generator state (uint8)


def adapter_bytes(model: PeftModel) -> bytes:
    """The LoRA weights in PEFT's on-disk format."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return save(tensors, metadata={"format": "pt"})


def state_bytes(optimizer: torch.optim.Optimizer, param_names: list[str], state: RunState) -> bytes:
    import torch
    from safetensors.torch import save

    tensors = {"rng.torch": torch.get_rng_state()}
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"opt.{index}.{key}"] = value.detach().to("cpu").contiguous()
    metadata = {"run_state": state.to_json(), "param_names": json.dumps(param_names)}
    return save(tensors, metadata=metadata)


def save(worktree: Path, *, model: PeftModel, optimizer: torch.optim.Optimizer, param_names: list[str], state: RunState, metric_lines: list[str]) -> None:
    """Write the three checkpoint files into the worktree (each atomically, as a new file)."""
    write_bytes(worktree / ADAPTER_FILE, adapter_bytes(model))
    write_bytes(worktree / STATE_FILE, state_bytes(optimizer, param_names, state))
    write_bytes(worktree / METRICS_FILE, "".join(line + "\n" for line in metric_lines).encode())


def load(worktree: Path) -> Saved | None:
    """The checkpoint in the worktree, or None before the first one."""
    from safetensors import safe_open

    path = worktree / STATE_FILE
    if not path.is_file():
        return None
    optimizer: dict[int, dict[str, Any]] = {}
    rng = None
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        for key in fh.keys():
            if key == "rng.torch":
                rng = fh.get_tensor(key)
            elif key.startswith("opt."):
                _, index, name = key.split(".", 2)
                optimizer.setdefault(int(index), {})[name] = fh.get_tensor(key)
    state = RunState.from_json(meta.get("run_state", "{}"))
    return Saved(state=state, optimizer=optimizer, param_names=json.loads(meta.get("param_names", "[]")), rng=rng)


def read_metric_lines(worktree: Path) -> list[str]:
    path = worktree / METRICS_FILE
    if not path.is_file():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
