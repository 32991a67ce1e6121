"""The Training screen's forms: raw text in, checked values out (or one line saying what is wrong).
They run when a form is submitted, on the UI thread: cheap checks only."""

from __future__ import annotations

from typing import Any

from hyprstream_tui import names
from hyprstream_tui.errors import InvalidInput


def check_adapter(values: dict[str, str]) -> dict[str, Any]:
    name = names.adapter_name(values["name"].strip())
    try:
        rank, alpha = int(values["rank"]), float(values["alpha"])
    except ValueError:
        raise InvalidInput("Rank must be a whole number and alpha a number, e.g. rank 8, alpha 16.") from None
    if rank <= 0 or alpha <= 0:
        raise InvalidInput(f"Rank and alpha must be positive, got rank {rank} and alpha {alpha}.")
    return {"name": name, "rank": rank, "alpha": alpha}


def check_sample(values: dict[str, str]) -> dict[str, str]:
    from hyprstream_tui.engine.train.data import check_row

    return check_row({"input": values["input"], "output": values["output"]}, "The sample")


def check_train(values: dict[str, str]):
    """A TrainConfig from the form; a field left blank is the engine's default (defaults.py)."""
    from hyprstream_tui.engine.train.config import TrainConfig

    def number(key: str, cast):
        text = values[key].strip()
        if not text:
            return None
        try:
            return cast(text)
        except ValueError:
            raise InvalidInput(f"`{key}` must be a number, got {text!r}.") from None  # worded by the form

    given = {key: number(key, cast) for key, cast in (("steps", int), ("learning_rate", float), ("batch_size", int),
                                                       ("checkpoint_every", int))}
    return TrainConfig(**{k: v for k, v in given.items() if v is not None}, nproc=processes(values.get("processes", "")),
                       new_run=values["new_run"].strip().lower() in ("y", "yes", "1", "true"))


def processes(text: str) -> int:
    """The form's "processes" (training processes under torch.distributed; blank is 1)."""
    import os

    text = text.strip() or "1"
    cores = os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise InvalidInput(f"`processes` must be a whole number, got {text!r}.") from None
    if not 1 <= n <= max(cores, 64):
        raise InvalidInput(f"`processes` must be between 1 and {max(cores, 64)} (this machine has {cores} cores), "
                           f"got {n}.")
    return n
