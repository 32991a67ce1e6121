"""Compiling the package's C kernels: once per source, flags and compiler, cached in the home.

A library is built with the system's C compiler (`$CC` or `cc`) into `$HYPRSTREAM_HOME/cache/kernels/`
under a name holding a hash of the source, the flags and the compiler, written to a temp name and
renamed (never half a file), and loaded by the caller with ctypes. `BuildError` says why a build
could not happen; callers then keep torch's own path.

Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from hyprstream_tui.store.atomic import tmp_name

T = TypeVar("T")

BUILD_TIMEOUT_S = 120


class BuildError(Exception):
    pass


def compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    found = shutil.which(cc)
    if found is None:
        raise BuildError(f"no C compiler ({cc!r} not found)")
    return found


def cache_dir() -> Path:
    from hyprstream_tui.settings import Paths

    return Paths.from_env().cache / "kernels"


def _target(source: Path, flags: tuple[str, ...], stem: str, folder: Path) -> Path:
    digest = hashlib.sha256(source.read_bytes() + " ".join((compiler(), *flags)).encode()).hexdigest()[:16]
    return folder / f"{stem}-{digest}.so"


def built(source: Path, flags: tuple[str, ...], stem: str) -> Path | None:
    """The library `library` would return, where the cache holds it already; None: not built."""
    target = _target(source, flags, stem, cache_dir())
    return target if target.is_file() else None


def library(source: Path, flags: tuple[str, ...], stem: str) -> Path:
    """The library compiled from `source` with `flags`, built now unless the cache holds it."""
    cc = compiler()
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="hyprstream-kernels-"))
    target = _target(source, flags, stem, folder)
    if target.is_file():
        return target
    tmp = tmp_name(target)  # the store's temp names (".<name>.<id>.incomplete")
    try:
        run = subprocess.run([cc, *flags, "-o", str(tmp), str(source)], capture_output=True,
                             text=True, timeout=BUILD_TIMEOUT_S)
        if run.returncode != 0:
            first = (run.stderr.strip().splitlines() or ["no output"])[0]
            raise BuildError(f"{cc} failed: {first}")
        os.replace(tmp, target)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{cc} took over {BUILD_TIMEOUT_S} s") from None
    except OSError as exc:
        raise BuildError(f"cannot build in {folder}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def refusal(switch: str) -> str:
    """Why a C library must not be used here ('' when it may): the environment variable `switch`
    set to 0, or a platform other than Linux on x86-64."""
    if os.environ.get(switch, "1") == "0":
        return f"{switch}=0"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return f"not Linux on x86-64 ({sys.platform}, {platform.machine()})"
    return ""


def opened(source: Path, flags: tuple[str, ...], stem: str, opener: Callable[[Path], T]) -> T:
    """`opener` applied to the compiled library; a cached file it cannot open (damaged) is built
    once more. Raises BuildError, or what `opener` raises on the rebuilt file (OSError,
    AttributeError)."""
    path = library(source, flags, stem)
    try:
        return opener(path)
    except (OSError, AttributeError):
        path.unlink(missing_ok=True)
        return opener(library(source, flags, stem))


__all__ = ["BUILD_TIMEOUT_S", "BuildError", "built", "cache_dir", "compiler", "library", "opened", "refusal"]
