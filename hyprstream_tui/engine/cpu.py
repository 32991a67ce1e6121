"""What this CPU can do, for the choices that depend on it (standard library only, no torch)."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 wins."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def usable_cores() -> int:
    """The cores this process may run on (its affinity), the engine's default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def lowest_priority() -> None:
    """The calling thread (and the OpenMP threads it starts) at nice 19 (Linux: a thread's own
    priority): for background copies that the next request must not wait behind."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        pass


__all__ = ["cpu_has_bf16", "lowest_priority", "usable_cores"]
