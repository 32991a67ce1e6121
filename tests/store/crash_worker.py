"""A real store writer for the kill tests: prints `ready`, then imports or commits until killed.

Run as `python crash_worker.py HOME import SRC NAME` or `python crash_worker.py HOME checkpoint MODEL ADAPTER N`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from hyprstream_tui.settings import Paths
from hyprstream_tui.store import Store


def main() -> None:
    home, mode, *rest = sys.argv[1:]
    store = Store(Paths.from_env(home))
    if mode == "import":
        src, name = rest
        print("ready", flush=True)
        store.import_model(Path(src), name=name)
    elif mode == "checkpoint":
        model, adapter, count = rest
        worktree = store.reset_worktree(model, adapter)
        start = (store.log(model, adapter)[0].step or 0) + 1
        print("ready", flush=True)
        for step in range(start, start + int(count)):
            tmp = worktree / "adapter" / ".tmp.safetensors"
            save_file({"w": np.full((256, 1024), step, np.float32)}, str(tmp))  # 1 MiB
            os.replace(tmp, worktree / "adapter" / "adapter_model.safetensors")
            (worktree / "metrics").mkdir(exist_ok=True)
            with open(worktree / "metrics" / "steps.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step}) + "\n")
            store.commit_checkpoint(model, adapter, step=step, metrics={"loss": 1.0 / step})
    print("done", flush=True)


if __name__ == "__main__":
    main()
