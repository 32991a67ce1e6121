"""Import of a 1 GB model folder: time and extra disk use, next to plain `git add` + `git commit`
and `git lfs track` + `git add` + `git commit` of the same folder, in one run.

    python benchmarks/store.py [--gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from hyprstream_tui.settings import Paths
from hyprstream_tui.store import Store
from hyprstream_tui.store.models import disk_usage


def make_model(dest: Path, gb: float) -> int:
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    rows = int(gb * 1e9 / 4 / 4096)
    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.random((rows, 4096), dtype=np.float32)}, str(dest / "model.safetensors"))
    return (dest / "model.safetensors").stat().st_size


def timed(fn) -> float:
    subprocess.run(["sync"], check=False)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        root = Path(tmp)
        size = make_model(root / "src", args.gb)
        store = Store(Paths.from_env(root / "home"))
        rows = []

        def measure(label: str, fn, where: Path) -> None:
            before = disk_usage(root)
            seconds = timed(fn)
            extra = disk_usage(root) - before
            rows.append((label, seconds, extra))

        measure("hyprstream model import (copy)", lambda: store.import_model(root / "src", name="copy"), root)
        measure("hyprstream model import --link", lambda: store.import_model(root / "src", name="link", link=True), root)

        plain = root / "plain"
        shutil.copytree(root / "src", plain, copy_function=os.link)  # hard links: the copy itself costs nothing

        def git_plain() -> None:
            git(plain, "init", "-q")
            git(plain, "add", "-A")
            git(plain, "commit", "-qm", "import")

        measure("git add + git commit", git_plain, plain)

        lfs = root / "lfs"
        shutil.copytree(root / "src", lfs, copy_function=os.link)

        def git_lfs() -> None:
            git(lfs, "init", "-q")
            git(lfs, "lfs", "install", "--local")
            git(lfs, "lfs", "track", "*.safetensors")
            git(lfs, "add", "-A")
            git(lfs, "commit", "-qm", "import")

        have_lfs = shutil.which("git-lfs") is not None
        if have_lfs:
            measure("git lfs track + git add + git commit", git_lfs, lfs)

        print(f"weights: {size / 1e9:.2f} GB")
        print(f"{'operation':<40} {'seconds':>8} {'extra disk':>11} {'x weights':>10} {'time vs git':>12}")
        git_time = rows[2][1]
        for label, seconds, extra in rows:
            print(f"{label:<40} {seconds:8.2f} {extra / 1e9:9.2f}GB {extra / size:10.2f} {seconds / git_time:11.2f}x")


if __name__ == "__main__":
    main()
