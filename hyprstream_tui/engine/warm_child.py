"""Imported once by the forkserver of the TUI's child processes (`engine.forkserver`): lower its
priority, then import what every child needs, so each forks ready to load its model.

Importing this module anywhere else lowers the calling thread's priority: only the forkserver
imports it.
"""

from __future__ import annotations

import importlib
import os

BACKGROUND_NICE = 10

# OpenMP threads that wait at a barrier sleep instead of spinning. GNU OpenMP spins for a while
# unless its own process has more threads than cores; beside the app's generation (another
# process's threads on the same cores) spinning starves both: measured on 2 cores with the
# 0.5B-shaped model, a training step took 24 s instead of 4 s next to a generation. Read by the
# OpenMP runtime when torch loads it, so before the imports below.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

try:  # the forkserver's children (the jobs) inherit it
    os.nice(BACKGROUND_NICE)
except (AttributeError, OSError):  # pragma: no cover - not on this platform / not allowed
    pass

# The forkserver shares the app's terminal: an import-time warning would be drawn over the UI.
# (Each job sends its own output to $HYPRSTREAM_HOME/logs/training.log.)
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 1)
os.dup2(_null, 2)
os.close(_null)

_transformers = importlib.import_module("transformers")
for _name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast"):
    getattr(_transformers, _name)  # resolve the lazy modules now, not in each job
_peft = importlib.import_module("peft")
for _name in ("LoraConfig", "get_peft_model", "set_peft_model_state_dict", "get_peft_model_state_dict"):
    getattr(_peft, _name)
for _module in ("safetensors.torch", "hyprstream_tui.engine.loader", "hyprstream_tui.engine.train.job",
                "hyprstream_tui.engine.train.loop", "hyprstream_tui.store", "hyprstream_tui.engine.engine",
                "hyprstream_tui.engine.generate", "hyprstream_tui.engine.chat"):
    importlib.import_module(_module)
# The fused decode step's C library: compiled now (once per home, under a second) rather than in
# the first job that needs it. Only compiled: its check runs torch operations, which each job does
# itself after the fork (about 10 ms), as OpenMP threads do not survive a fork.
_build = importlib.import_module("hyprstream_tui.engine.tuned.build")
try:
    importlib.import_module("hyprstream_tui.engine.tuned.step").compile_library()
except (_build.BuildError, OSError):  # no compiler, no disk: each job finds out and keeps torch's step
    pass
