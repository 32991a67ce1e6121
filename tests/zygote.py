"""What the test zygotes share (tests/train/train_worker.py, tests/reliability/kill_zygote.py,
tests/reliability/disk_zygote.py): import the `hyprstream` CLI with every heavy module its commands
load, once, so that a forked child runs a real command without a 5-10 s import; and end that child
with the command's own exit code.

Importing this module never runs a torch operation, so no thread pool exists yet when a zygote
forks. Set OMP_NUM_THREADS and the like before importing it.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

import huggingface_hub  # noqa: F401  (preloaded for the children)
import peft  # noqa: F401
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
from safetensors import safe_open  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from hyprstream_tui import cli
from hyprstream_tui.engine.train import export, job, loop  # noqa: F401
from hyprstream_tui.store import hub, store  # noqa: F401


def warm_up() -> None:
    """Build transformers' checkpoint-conversion regexes once (half a second per model load
    otherwise); the children inherit them. No tensor is touched."""
    try:
        from transformers.conversion_mapping import _build_checkpoint_conversion_mapping

        _build_checkpoint_conversion_mapping()
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


def run_cli_and_exit(args: list[str]) -> NoReturn:
    """In a forked child: `hyprstream ARGS`, then exit with its code (70 after a traceback)."""
    code = 70
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a traceback is what the tests look for
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
