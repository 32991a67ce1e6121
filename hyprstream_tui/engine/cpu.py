"""What this CPU can do, for the choices that depend on it (standard library only, no torch)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 wins."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


__all__ = ["cpu_has_bf16"]
