"""The one-row bf16 product of a decode step, through a small C kernel that gives torch's bits.

On a CPU without native bf16 (torch's CPU capability "AVX2"), a bf16 decode step is mostly
one-row matrix products, and torch's kernel for them reads the weights at about 11-12 GB/s where
the memory gives about 20 (2-core AVX2 EPYC, `benchmarks/decode.py`). `gemv_bf16.c` computes the
same dot products in the same order with the same instructions, so its results are torch's bit
for bit and greedy tokens do not move; it reads the weights at about 16 GB/s.

The kernel is compiled once with the system's C compiler (`$CC` or `cc`) into
`$HYPRSTREAM_HOME/cache/kernels/` and loaded with ctypes (which lets go of the GIL during the
call). It is used only where all of these hold, and torch's own kernel runs otherwise:
- Linux on x86-64, torch's CPU capability is AVX2 (an AVX-512 build of torch sums in another
  order), and `HYPRSTREAM_NATIVE_GEMV` is not `0`;
- a C compiler builds the file;
- on load, its results equal `torch.nn.functional.linear` bit for bit on a set of shapes and
  values (with and without bias, large, tiny and non-finite values).
`status()` says which, and why not.

Imports torch at module level: only `engine.tuned.kernels` imports this module.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from hyprstream_tui.engine.tuned import build
from hyprstream_tui.engine.tuned.build import BuildError

SOURCE = Path(__file__).with_name("gemv_bf16.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "HYPRSTREAM_NATIVE_GEMV"
K_MULTIPLE = 64  # the kernel covers in_features that are multiples of this


class Kernel:
    """The loaded C function, checked against torch."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        fn = lib.hs_gemv_bf16
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        self._lib = lib  # keeps the library loaded while the function lives
        self._fn = fn
        self.path = path

    def fits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether linear(x, weight, bias) is one row this kernel computes."""
        k = weight.shape[-1]
        return (
            x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dim() == 2 and k % K_MULTIPLE == 0 and x.numel() == k
            and x.is_contiguous() and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous()
                                  and bias.device.type == "cpu"))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, weight, bias) for one row (`fits` must hold): shape [..., out]."""
        out, k = weight.shape
        y = torch.empty((*x.shape[:-1], out), dtype=torch.bfloat16)
        rc = self._fn(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                      y.data_ptr(), k, out, torch.get_num_threads())
        if rc != 0:  # only out of memory for x's fp32 copy: torch's own kernel then
            return F.linear(x, weight, bias)
        return y


_lock = threading.Lock()
_state: dict = {}


def kernel() -> Kernel | None:
    """The checked kernel, built and loaded on first use; None where torch's kernel must run."""
    if _state.get("off"):
        return None
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                k, why = _load()
                _state["why"] = why
                _state["kernel"] = k
    return _state["kernel"]


def set_enabled(on: bool) -> None:
    """Turn the kernel off (torch's kernel everywhere) or back on, for this process: for
    benchmarks and tests that compare the two."""
    _state["off"] = not on


def status() -> str:
    """One line: whether decode steps use the kernel, and why not."""
    if _state.get("off"):
        return "native bf16 GEMV: off (turned off in this process)"
    k = kernel()
    return f"native bf16 GEMV: on ({k.path})" if k is not None else f"native bf16 GEMV: off ({_state['why']})"


def _load() -> tuple[Kernel | None, str]:
    why = build.refusal(ENV_SWITCH)
    if why:
        return None, why
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        return None, f"torch's CPU capability is {capability}, not AVX2"
    try:
        k = build.opened(SOURCE, FLAGS, "gemv_bf16", Kernel)
    except BuildError as exc:
        return None, str(exc)
    except (OSError, AttributeError) as exc:
        return None, f"cannot load the kernel: {exc}"
    bad = self_check(k)
    if bad:
        return None, f"its results differ from torch's ({bad})"
    return k, ""


def _build() -> Path:
    """The compiled library (`build.library`: built once, cached by a hash of source, flags, compiler)."""
    return build.library(SOURCE, FLAGS, "gemv_bf16")


def check_values(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(x [1, k], weight [n, k], bias or None) cases: layer-like scales, wide ranges of
    magnitude, values whose sums overflow, subnormals and non-finite inputs."""
    cases = []
    for n, k, bias in ((1, 64, False), (37, 128, True), (300, 896, True), (64, 8256, False)):
        w = torch.randn(n, k, generator=g) * 0.05
        x = torch.randn(1, k, generator=g) * 3
        b = torch.randn(n, generator=g) if bias else None
        cases.append((x, w, b))
    w = torch.randn(50, 192, generator=g) * torch.logspace(-30, 30, 192)  # wide magnitudes
    cases.append((torch.randn(1, 192, generator=g) * torch.logspace(30, -30, 192), w, None))
    x = torch.full((1, 128), 3e38)  # sums overflow to inf
    cases.append((x, torch.ones(3, 128), torch.tensor([1.0, -1.0, 0.5])))
    w = torch.randn(9, 64, generator=g) * 1e-39  # subnormal products
    cases.append((torch.randn(1, 64, generator=g) * 1e-2, w, None))
    x = torch.randn(1, 64, generator=g)
    x[0, 3], x[0, 40] = float("inf"), float("nan")
    cases.append((x, torch.randn(5, 64, generator=g), torch.randn(5, generator=g)))
    for k in (896, 4864):
        cases.append(order_revealing(g, 512, k))
    return [(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()) for x, w, b in cases]


def order_revealing(g: torch.Generator, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Rows whose fp32 sum depends on the order of its additions, visibly after rounding to bf16.

    With random data, an addition order differs from torch's in a few fp32 units in the last
    place, which changes about one bf16 value in 10,000. Here each row holds +-2^24 at random
    places and small integers at others, and x is all ones: whether a small integer is added
    before or after the big values cancel decides whether it survives (2^24 + 1 == 2^24 in
    fp32), so a different order gives a different result in most rows."""
    w = torch.zeros(n, k)
    big = torch.randint(0, k, (n, 4), generator=g)
    small = torch.randint(0, k, (n, 12), generator=g)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0]) * 2.0**24
    w.scatter_(1, small, torch.randint(1, 4, (n, 12), generator=g).float())
    w.scatter_(1, big, signs.expand(n, 4))
    return torch.ones(1, k), w, None


def self_check(k: Kernel) -> str:
    """'' when the kernel gives torch's bits on every `check_values` case, else what differed."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for x, w, b in check_values(g):
            ours, theirs = k.linear(x, w, b).view(torch.int16), F.linear(x, w, b).view(torch.int16)
            if not torch.equal(ours, theirs):
                return f"{int((ours != theirs).sum())} of {theirs.numel()} values, shape {tuple(w.shape)}"
    return ""
