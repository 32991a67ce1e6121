"""`step.c`'s side that needs no torch: its structures, its compiled library, and whether that
library was checked on this CPU.

`step.py` (torch) describes a loaded model to the library and checks the library's products
against torch's at its first load in a process (`step.self_check`); a library that passed is
marked (`mark_checked`: a file beside it naming this CPU). `engine.light`, which answers without
importing torch, opens only a library so marked (`checked_library`): it cannot run the check
itself, and needs no compiler (a library not built yet means the engine's path).

Standard library only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path
from typing import Any

from hyprstream_tui.engine.tuned import build
from hyprstream_tui.store.atomic import tmp_name

SOURCE = Path(__file__).with_name("step.c")
# -ffp-contract=off: a product and a sum stay two roundings wherever the source writes them so, in
# the step and the prefill alike (their values agree bit for bit because they run the same operations)
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
STEM = "step"
ENV_SWITCH = "HYPRSTREAM_FUSED_STEP"
INT8, INT4, FP32, BF16 = 1, 2, 3, 4  # step.c's weight kinds
BF16_PACKED = 5  # bf16 rows packed for an exact model (step.c's kind 5; never a model's own kind)
QUANTIZED = frozenset({INT8, INT4})
EVERY = frozenset({INT8, INT4, FP32, BF16})
DEFAULT_KINDS = QUANTIZED | {FP32}  # what runs fused unless the switch says otherwise
KINDS_BY_SWITCH = {"quantized": QUANTIZED, "all": EVERY}
GROUP = 32  # int4 values per scale and zero (the cache's and quantize_int4's)
MAX_HEAD_DIM = 512
CHECKED = ".checked"

P = ctypes.c_void_p
I64 = ctypes.c_int64


class Lin(ctypes.Structure):
    _fields_ = [("kind", I64), ("out", I64), ("inputs", I64), ("w", P), ("s", P), ("bias", P)]


class Layer(ctypes.Structure):
    _fields_ = [("q", Lin), ("k", Lin), ("v", Lin), ("o", Lin), ("gate", Lin), ("up", Lin), ("down", Lin),
                ("ln1", P), ("ln2", P), ("kc", P), ("vc", P)]


LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # a Layer's Lin fields, in order


class Spec(ctypes.Structure):
    _fields_ = [("layers", I64), ("dim", I64), ("heads", I64), ("kv_heads", I64), ("head_dim", I64),
                ("ffn", I64), ("vocab", I64), ("capacity", I64), ("threads", I64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("bf16", I64), ("embed", P),
                ("embed_f32", I64),
                ("norm", P), ("inv_freq", P), ("head", Lin), ("layer", ctypes.POINTER(Layer)),
                ("scratch", P),
                ("exact", I64), ("sum_lanes", I64), ("rope_positions", I64),
                ("silu", P), ("rope_cos", P), ("rope_sin", P)]


def for_sequence(spec: Spec, layers: Any) -> tuple[Spec, Any]:
    """Copies of a model's structures for one sequence, to point at its own KV cache and scratch
    (the weights' pointers shared)."""
    own = (Layer * len(layers))()
    ctypes.memmove(own, layers, ctypes.sizeof(own))
    copy = Spec()
    ctypes.memmove(ctypes.byref(copy), ctypes.byref(spec), ctypes.sizeof(Spec))
    copy.layer = ctypes.cast(own, ctypes.POINTER(Layer))
    return copy, own


def scratch_floats(spec: Spec, widest: int) -> int:
    """Floats of a step's scratch buffer (`hs_step`'s layout) for `spec`'s model and capacity."""
    s = spec
    return (2 * s.dim + (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim + s.ffn
            + s.heads * s.capacity + widest + widest // GROUP + 16)


def open_library(path: Path) -> Any:
    lib = ctypes.CDLL(str(path))
    lib.hs_step.restype = ctypes.c_int
    lib.hs_step.argtypes = [ctypes.POINTER(Spec), I64, I64, P]
    lib.hs_prefill.restype = ctypes.c_int
    lib.hs_prefill.argtypes = [ctypes.POINTER(Spec), P, I64, I64, P, P]
    lib.hs_prefill_every.restype = ctypes.c_int
    lib.hs_prefill_every.argtypes = [ctypes.POINTER(Spec), P, I64, I64, P, P]
    lib.hs_prefill_floats.restype = I64
    lib.hs_prefill_floats.argtypes = [ctypes.POINTER(Spec)]
    lib.hs_exact_begin.restype = ctypes.c_int
    lib.hs_exact_begin.argtypes = [ctypes.POINTER(Spec), I64, I64, P]
    lib.hs_exact_layer.restype = ctypes.c_int
    lib.hs_exact_layer.argtypes = [ctypes.POINTER(Spec), I64, I64, P, P, P]
    lib.hs_exact_run.restype = ctypes.c_int
    lib.hs_exact_run.argtypes = [ctypes.POINTER(Spec), I64, I64, P, P, P, ctypes.c_double]
    lib.hs_exact_torch.restype = None
    lib.hs_exact_torch.argtypes = [P, P, P, P, ctypes.c_int32, ctypes.c_int32]
    lib.hs_pack_rows.restype = None
    lib.hs_pack_rows.argtypes = [P, I64, I64, P, I64]
    lib.hs_sum_squares.restype = ctypes.c_float
    lib.hs_sum_squares.argtypes = [P, I64, I64]
    lib.hs_rows.restype = None
    lib.hs_rows.argtypes = [ctypes.POINTER(Lin), P, I64, P, P]
    return lib


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def refusal() -> str:
    """Why the library must not run here ('' when it may): the switch, the platform, the CPU."""
    why = build.refusal(ENV_SWITCH)
    if why:
        return why
    missing = {"avx2", "fma"} - cpu_flags()
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else ""


def this_cpu() -> str:
    """What the check held for: this CPU's model and flags."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return hashlib.sha256((model + " " + " ".join(sorted(cpu_flags()))).encode()).hexdigest()[:32]


def mark_checked(path: Path) -> None:
    """Note beside the library at `path` that it passed the check on this CPU (best effort)."""
    marker = path.with_name(path.name + CHECKED)
    try:
        if marker.is_file() and marker.read_text() == this_cpu():
            return
        tmp = tmp_name(marker)
        tmp.write_text(this_cpu())
        os.replace(tmp, marker)
    except OSError:
        pass


def exact_marker(library: Path | None = None) -> Path | None:
    """The file beside the library at `library` (default: the built one) that says its exact bf16
    step passed its check against torch (`exact.check_once` writes what: `exact.mark_text`); None
    where no library is built."""
    if library is None:
        try:
            library = build.built(SOURCE, FLAGS, STEM)
        except build.BuildError:
            return None
    return None if library is None else library.with_name(library.name + ".exact")


def checked_library() -> Any:
    """The compiled library, opened, where it is built and checked on this CPU already; else None
    (never compiles)."""
    if refusal():
        return None
    try:
        path = build.built(SOURCE, FLAGS, STEM)
    except build.BuildError:
        return None
    if path is None:
        return None
    try:
        if path.with_name(path.name + CHECKED).read_text() != this_cpu():
            return None
        return open_library(path)
    except (OSError, AttributeError):
        return None


def fused_kinds() -> frozenset[int]:
    """The weight kinds the engine runs fused (`HYPRSTREAM_FUSED_STEP`): int8, int4 and fp32 ones;
    `quantized`: int8 and int4 only; `all`: bf16 ones too (see `step`'s docstring)."""
    return KINDS_BY_SWITCH.get(os.environ.get(ENV_SWITCH, "1"), DEFAULT_KINDS)


__all__ = ["BF16", "DEFAULT_KINDS", "EVERY", "FLAGS", "INT4", "INT8", "FP32", "Layer", "Lin", "QUANTIZED",
           "SOURCE", "Spec", "checked_library", "exact_marker", "fused_kinds", "mark_checked", "open_library", "refusal"]
