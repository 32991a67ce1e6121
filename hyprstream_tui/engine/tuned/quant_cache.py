"""Quantized weights made once per model commit and scheme, kept under the home's cache.

`--quantize int8` spends most of its load on the quantizer: every weight converted, scaled and
rounded (about 0.3 s on SmolLM2-135M, 2.5x an fp32 load, which only maps the file). The result is
the same for the same weights, so the first load writes it to
`<home>/cache/quantized/<key>.safetensors` and later loads map that file instead: the original
weights' pages that the quantized layers replace are then never read.

- The key is content-addressed: a hash of the scheme, this format's version, the model's commit
  and each weight file's name, size and modification time (a worktree edited after its commit
  gets a new key, never a stale entry). Folder models, which have no commit, are not cached.
- Entries are written to a temporary name and renamed into place; an entry that cannot be read
  counts as missing and is made again.
- The cache is capped (`HYPRSTREAM_QUANT_CACHE_MAX`, bytes, default 8 GB): after a write the
  least recently used entries go first. `hyprstream cache prune` empties it or trims it to a size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT = 1
ENV_MAX = "HYPRSTREAM_QUANT_CACHE_MAX"
DEFAULT_MAX = 8_000_000_000
SUFFIX = ".safetensors"
STALE_S = 600.0


def folder(cache: Path) -> Path:
    """The quantized-weight entries under a home's cache folder."""
    return cache / "quantized"


def key(model_dir: Path, commit: str, scheme: str, weight_files: list[Path]) -> str:
    """The entry name for `scheme` of the weights of `commit` as they are on disk now."""
    facts: dict[str, object] = {"format": FORMAT, "scheme": scheme, "commit": commit, "files": []}
    files: list[object] = []
    for path in [model_dir / "config.json", *weight_files]:
        stat = path.stat()
        files.append([path.name, stat.st_size, stat.st_mtime_ns])
    facts["files"] = files
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def read(cache: Path, name: str) -> dict[str, "torch.Tensor"] | None:
    """The tensors of entry `name`, memory-mapped; None when there is none or it is unreadable."""
    from hyprstream_tui.engine.native import read_safetensors
    from hyprstream_tui.engine.native.model import Unsupported

    path = folder(cache) / f"{name}{SUFFIX}"
    if not path.is_file():
        return None
    try:
        tensors = read_safetensors(path)
    except (Unsupported, OSError) as exc:
        log.warning("quantized cache entry %s is unreadable (%s): making it again", path.name, exc)
        return None
    tensors = {k: v for k, v in tensors.items() if not k.startswith(PAD)}
    if any(v.numel() and v.data_ptr() % ALIGN for v in tensors.values()):
        # Off a boundary (a file of an earlier version, or another writer): made again and written
        # aligned, rather than copied at every load (a crash in a kernel otherwise)
        log.warning("quantized cache entry %s is not 64-byte aligned: making it again", path.name)
        return None
    touch(path)
    return tensors


def write(cache: Path, name: str, tensors: dict[str, "torch.Tensor"], about: dict[str, str] | None = None
          ) -> Path | None:
    """Store `tensors` as entry `name` (atomically; `about` goes into its metadata: model, commit,
    scheme), then hold the cache to its cap. A cache that cannot be written (full disk, read-only
    home) costs the next load its time, nothing else."""
    where = folder(cache)
    path = where / f"{name}{SUFFIX}"
    tmp = where / f".{name}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        where.mkdir(parents=True, exist_ok=True)
        save(tmp, tensors, {**(about or {}), "format": str(FORMAT)})
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the quantized cache entry %s: %s", path, exc)
        tmp.unlink(missing_ok=True)
        return None
    prune(cache, keep_bytes=cap(), spare=path)
    return path


NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8", "uint8": "U8"}  # U8: int4, two a byte


ALIGN = 64  # torch's int8 kernels crash on weights that start off a 64-byte boundary (measured: 8 mod 64)
PAD = "#pad"


def save(path: Path, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str]) -> None:
    """`tensors` as a safetensors file, written straight from their memory (safetensors' own
    `save_file` copies each tensor to bytes first: 1.3 s against 0.1 s for 190 MB here). Every
    tensor starts on a 64-byte boundary of the file (of the page-aligned map, once read): the
    format allows no holes, so the gaps are `#pad` tensors of bytes, which `read` leaves out."""
    import torch

    order = [k for k in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)) if not k.startswith(PAD)]
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for k in order:
        t = tensors[k]
        if offset % ALIGN:
            header[f"{PAD}{offset}"] = {"dtype": "U8", "shape": [-offset % ALIGN],
                                        "data_offsets": [offset, offset + -offset % ALIGN]}
            offset += -offset % ALIGN
        size = t.numel() * t.element_size()
        header[k] = {"dtype": NAMES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # the data starts on a boundary too
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for k in order:
            t = tensors[k].contiguous()
            if fh.tell() % ALIGN:
                fh.write(bytes(-fh.tell() % ALIGN))
            if t.numel():
                fh.write(t.view(-1).view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())


def touch(path: Path) -> None:
    """Mark entry `path` most recently used: the cap evicts others first."""
    try:
        os.utime(path)
    except OSError:
        pass


def describe(path: Path) -> dict[str, str]:
    """An entry's metadata (model, commit, scheme), read from its header alone; {} if unreadable."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(min(size, 1 << 20))).get("__metadata__", {})
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}


def cap() -> int:
    raw = os.environ.get(ENV_MAX, "")
    try:
        return max(0, int(raw)) if raw else DEFAULT_MAX
    except ValueError:
        log.warning("%s=%r is not a number of bytes: using %d", ENV_MAX, raw, DEFAULT_MAX)
        return DEFAULT_MAX


@dataclass(frozen=True)
class Pruned:
    removed: int
    freed_bytes: int
    kept: int
    kept_bytes: int


def prune(cache: Path, *, keep_bytes: int = 0, spare: Path | None = None) -> Pruned:
    """Remove entries, least recently used first, until at most `keep_bytes` remain (`spare` is
    never removed); temporary files of a write interrupted over `STALE_S` ago go too."""
    where = folder(cache)
    if not where.is_dir():
        return Pruned(0, 0, 0, 0)
    entries: list[tuple[float, int, Path]] = []
    removed = freed = 0
    for path in where.iterdir():
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.name.endswith(".tmp"):
            if time.time() - stat.st_mtime > STALE_S:  # a write still under way is left alone
                path.unlink(missing_ok=True)
                removed, freed = removed + 1, freed + stat.st_size
            continue
        if path.suffix == SUFFIX:
            entries.append((stat.st_mtime, stat.st_size, path))
    entries.sort(key=lambda e: e[0], reverse=True)  # newest first
    total = sum(size for _, size, _ in entries)
    kept = list(entries)
    for mtime, size, path in reversed(entries):  # oldest first
        if total <= keep_bytes:
            break
        if path == spare:
            continue
        path.unlink(missing_ok=True)
        kept.remove((mtime, size, path))
        total -= size
        removed, freed = removed + 1, freed + size
    return Pruned(removed, freed, len(kept), total)


__all__ = ["Pruned", "cap", "describe", "folder", "key", "prune", "read", "touch", "write"]
