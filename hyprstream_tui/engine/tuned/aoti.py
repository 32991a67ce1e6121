"""torch's own CPU kernels without `import torch`: libtorch_cpu's stable C interface (the AOTInductor
shim, `torch/csrc/inductor/aoti_torch/c/shim.h`), called through ctypes on numpy buffers.

`import torch` costs about 1.2 s here, most of it Python: its modules, its bindings, its operator
registrations. The library under it loads in about 0.25 s, and its C shim runs any of torch's
kernels on memory it is handed: matrix products (`mm`, `addmm`, through the same `addmm_impl_cpu_`
and oneDNN path as `F.linear`) and `scaled_dot_product_attention`'s CPU flash kernel. Their results
are torch's, bit for bit, because the code is torch's; `engine.tuned.exact_image` builds a bf16
model's forward from them (issue 21's bf16 cold start).

`Kernels.load()` finds the installed torch without importing it; None where it cannot (no torch, a
build without the shim's functions).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

_handle = ctypes.c_void_p
_i64 = ctypes.c_int64
SET_THREADS = "_ZN2at15set_num_threadsEi"  # at::set_num_threads(int), what torch.set_num_threads calls
NEEDED = ("aoti_torch_create_tensor_from_blob", "aoti_torch_delete_tensor_object", "aoti_torch_get_data_ptr",
          "aoti_torch_cpu_mm_out", "aoti_torch_cpu_addmm_out", "aoti_torch_get_strides",
          "aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu", "aoti_torch_dtype_bfloat16",
          "aoti_torch_device_type_cpu", SET_THREADS)


def library_path() -> Path | None:
    """The installed torch's libtorch_cpu, found without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "lib" / "libtorch_cpu.so"
    return path if path.is_file() else None


def build_id(path: Path) -> str:
    """Which torch build `path` is (its size and time): a table made by another build is not used."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


_loading = threading.Lock()
_loaded: dict[str, "Kernels | None"] = {}


class TorchError(RuntimeError):
    """A kernel refused its arguments (a bug here: the shapes are checked before)."""


class Tensor:
    """A bf16 torch tensor over `array`'s memory (kept alive with it); `sizes`/`strides` in elements."""

    __slots__ = ("k", "handle", "array", "sizes")

    def __init__(self, k: "Kernels", array: Any, sizes: tuple[int, ...], strides: tuple[int, ...] | None = None
                 ) -> None:
        self.k, self.array, self.sizes = k, array, sizes
        if strides is None:
            dense: list[int] = []
            acc = 1
            for s in reversed(sizes):
                dense.insert(0, acc)
                acc *= s
            strides = tuple(dense)
        n = len(sizes)
        self.handle = _handle()
        address = array.ctypes.data if hasattr(array, "ctypes") else int(array)
        k.check(k.lib.aoti_torch_create_tensor_from_blob(
            _handle(address), _i64(n), (_i64 * n)(*sizes), (_i64 * n)(*strides), _i64(0), k.bf16, k.cpu, 0,
            ctypes.byref(self.handle)), "a tensor")

    def __del__(self) -> None:
        if self.handle:
            self.k.lib.aoti_torch_delete_tensor_object(self.handle)
            self.handle = _handle()


class Kernels:
    """The loaded library and the calls `exact_image` makes."""

    def __init__(self, lib: Any, path: Path) -> None:
        self.lib, self.path = lib, path
        lib.aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu.argtypes = [
            _handle, _handle, _handle, ctypes.c_double, ctypes.c_int32, ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_double), ctypes.POINTER(_handle), ctypes.POINTER(_handle)]
        lib.aoti_torch_cpu_addmm_out.argtypes = [_handle, _handle, _handle, _handle, ctypes.c_double, ctypes.c_double]
        lib.aoti_torch_cpu_mm_out.argtypes = [_handle, _handle, _handle]
        lib.aoti_torch_get_data_ptr.argtypes = [_handle, ctypes.POINTER(ctypes.c_void_p)]
        lib.aoti_torch_get_strides.argtypes = [_handle, ctypes.POINTER(ctypes.POINTER(_i64))]
        lib.aoti_torch_delete_tensor_object.argtypes = [_handle]
        self.bf16 = lib.aoti_torch_dtype_bfloat16()
        self.cpu = lib.aoti_torch_device_type_cpu()

    @classmethod
    def load(cls) -> "Kernels | None":
        """The library, loaded once per process."""
        with _loading:
            if "kernels" not in _loaded:
                _loaded["kernels"] = cls._open()
        return _loaded["kernels"]

    @classmethod
    def _open(cls) -> "Kernels | None":
        path = library_path()
        if path is None:
            return None
        try:
            lib = ctypes.CDLL(str(path))
            if not all(hasattr(lib, name) for name in NEEDED):
                return None
        except OSError:
            return None
        return cls(lib, path)

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise TorchError(f"torch refused {what} (error {code})")

    def threads(self, n: int) -> None:
        """torch's intra-op threads (`torch.set_num_threads`): oneDNN's blocking follows them."""
        getattr(self.lib, SET_THREADS)(ctypes.c_int(n))

    def tensor(self, array: Any, sizes: tuple[int, ...], strides: tuple[int, ...] | None = None) -> Tensor:
        return Tensor(self, array, sizes, strides)

    def linear(self, out: Tensor, x: Tensor, weight_t: Tensor, bias: Tensor | None) -> None:
        """out = x @ weight_t (+ bias): `F.linear`'s own `addmm`/`mm` (weight_t: the [in, out] view)."""
        if bias is None:
            self.check(self.lib.aoti_torch_cpu_mm_out(out.handle, x.handle, weight_t.handle), "mm")
        else:
            self.check(self.lib.aoti_torch_cpu_addmm_out(out.handle, bias.handle, x.handle, weight_t.handle,
                                                         1.0, 1.0), "addmm")

    def attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, out: "np.ndarray") -> None:
        """`F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal, enable_gqa=...)` as
        torch's CPU flash kernel computes it; its output ([S, heads, head_dim], bf16) into `out`."""
        result, lse, s = _handle(), _handle(), ctypes.c_double(scale)
        heads, width = q.sizes[1], q.sizes[3]
        layout = (out.size, width, heads * width, 1)  # [1, heads, S, head_dim] over [S, heads, head_dim]
        self.check(self.lib.aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu(
            q.handle, k.handle, v.handle, 0.0, int(causal), None, ctypes.byref(s), ctypes.byref(result),
            ctypes.byref(lse)), "attention")
        try:
            data = ctypes.c_void_p()
            self.check(self.lib.aoti_torch_get_data_ptr(result, ctypes.byref(data)), "attention's output")
            strides = ctypes.POINTER(_i64)()
            self.check(self.lib.aoti_torch_get_strides(result, ctypes.byref(strides)), "attention's strides")
            if not data.value or tuple(strides[i] for i in range(4)) != layout:
                raise TorchError("attention's output is not laid out [S, heads, head_dim]")
            ctypes.memmove(out.ctypes.data, data.value, out.nbytes)
        finally:
            self.lib.aoti_torch_delete_tensor_object(result)
            self.lib.aoti_torch_delete_tensor_object(lse)


_handed: dict[int, bool] = {}  # per step.c library: whether it holds torch's attention


def hand_to(lib: Any) -> bool:
    """Give the fused step's library (`step.c`'s `hs_exact_torch`) torch's tensor and attention
    functions, once: its exact step then calls torch's attention itself (`hs_exact_run`). False
    where this torch lacks them."""
    if id(lib) not in _handed:
        k = Kernels.load()
        if k is not None:
            fn = [ctypes.cast(getattr(k.lib, name), ctypes.c_void_p).value for name in (
                "aoti_torch_create_tensor_from_blob", "aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu",
                "aoti_torch_get_data_ptr", "aoti_torch_delete_tensor_object")]
            lib.hs_exact_torch(*fn, k.bf16, k.cpu)
        _handed[id(lib)] = k is not None
    return _handed[id(lib)]


__all__ = ["Kernels", "Tensor", "TorchError", "build_id", "hand_to", "library_path"]
