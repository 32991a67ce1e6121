"""Checks on model files before they enter the store, without torch: safetensors headers, config.json,
pickle files and remote code. Everything here reads at most a header, so a hostile file costs nothing.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyprstream_tui.errors import InvalidInput, NotFound, UnsafeContent

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER = 100 << 20  # the safetensors reference implementation's own limit
MAX_CONFIG = 16 << 20
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse and validate a safetensors header; raise InvalidInput on anything malformed."""
    bad = f"{path.name} is not a valid safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InvalidInput(f"{bad} (truncated before its header): re-download or re-export it.")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or length > size - 8:
                raise InvalidInput(f"{bad} (header length {length} exceeds the file): the file is truncated or corrupt.")
            raw = fh.read(length)
    except OSError as exc:
        raise InvalidInput(f"Cannot read {path.name}: {exc.strerror}.") from exc
    try:
        header = json.loads(raw.decode("utf-8"))  # only UTF-8, as the reference (json.loads guesses UTF-16/32)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise InvalidInput(f"{bad} (its header is not JSON): the file is corrupt.") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{bad} (its header is not a JSON object).")
    return _check_tensors(header, size - 8 - length, bad)


def _check_tensors(header: dict[str, Any], data_len: int, bad: str) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    spans: list[tuple[int, int]] = []
    for name, meta in header.items():
        if not _utf8(name):  # a lone surrogate escape ("\\ud800"): Python's JSON takes it, the reference does not
            raise InvalidInput(f"{bad} (a tensor name is not valid UTF-8).")
        if name == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) and _utf8(k) and _utf8(v) for k, v in meta.items()):
                raise InvalidInput(f"{bad} (__metadata__ must map strings to strings).")
            continue
        if not isinstance(meta, dict):
            raise InvalidInput(f"{bad} (entry {name!r} is not an object).")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:  # a list or object is unhashable
            raise InvalidInput(f"{bad} (tensor {name!r} has unknown dtype {dtype!r}).")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInput(f"{bad} (tensor {name!r} has an invalid shape).")
        if not _fits_u64(shape):
            raise InvalidInput(f"{bad} (tensor {name!r} has a shape too large to address).")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise InvalidInput(f"{bad} (tensor {name!r} has invalid data offsets).")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise InvalidInput(f"{bad} (tensor {name!r} points outside the file): the file is truncated or corrupt.")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise InvalidInput(f"{bad} (tensor {name!r} size does not match its shape and dtype).")
        spans.append((begin, end))
        tensors.append(TensorInfo(name, dtype, tuple(shape)))
    spans.sort()
    for (_, prev_end), (begin, _) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise InvalidInput(f"{bad} (two tensors overlap).")
    # As the reference implementation: the tensors cover the data exactly, no gap, nothing after.
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise InvalidInput(f"{bad} (a gap in its data at byte {covered}): the file is corrupt.")
        covered = end
    if covered != data_len:
        raise InvalidInput(f"{bad} ({data_len - covered} bytes after its last tensor): the file is truncated or corrupt.")
    return tensors


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fits_u64(shape: list[int]) -> bool:
    """The element count, multiplied dimension by dimension, never passes 2**64 (the reference
    implementation's usize arithmetic refuses such a header even when a later dimension is 0)."""
    n = 1
    for d in shape:
        n *= d
        if n >= 1 << 64:
            return False
    return True


def parameter_count(tensors: list[TensorInfo]) -> int:
    return sum(math.prod(t.shape) for t in tensors)


def read_config(path: Path) -> dict[str, Any]:
    """Read a model's config.json; refuse remote code (`auto_map`)."""
    if not path.is_file():
        raise InvalidInput(f"No config.json in {path.parent}: point at a Hugging Face model folder (config.json + *.safetensors).")
    if path.stat().st_size > MAX_CONFIG:
        raise InvalidInput(f"{path} is too large to be a model config.")
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise InvalidInput(f"{path} is not valid JSON: fix or re-download it.") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"{path} must hold a JSON object.")
    if "auto_map" in config:
        raise UnsafeContent(
            f"{path.name} asks for remote code (auto_map): hyprstream never runs model code from a repository; "
            "use a model supported by transformers itself."
        )
    return config


def is_pickle(relpath: str) -> bool:
    return relpath.lower().endswith(PICKLE_SUFFIXES)


def architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return str(config.get("model_type", "unknown"))


def check_weights(folder: Path, *, allow_pickle: bool, what: str = "model") -> bool:
    """Whether to read safetensors (True) or pickle (False); refuse pickle unless allowed."""
    if not folder.is_dir():
        raise NotFound(f"The {what} folder {str(folder)!r} does not exist.")
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return True
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise NotFound(f"The {what} folder {str(folder)!r} holds no weights (*.safetensors).")
    if not allow_pickle:
        raise UnsafeContent(
            f"The {what} in {str(folder)!r} has only pickle weights ({pickles[0]}), which can run "
            "code when loaded: convert it to safetensors, or set `allow_pickle` if you trust it."
        )
    return False
