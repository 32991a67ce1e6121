"""Helpers for test modules (the conftests hold only fixtures and hooks): the repository root,
the result of a `hyprstream` subprocess, plain git as a reader, and the one-line-error check."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Plain git (and git-lfs) as a reader of our repositories."""
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=check)


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.returncode != 0, result
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle.lower() in err.lower(), err


def bf16_copy(src: Path, dest: Path) -> Path:
    """A copy of the model folder `src` at `dest` whose checkpoint holds its floats in bf16."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(dest / "model.safetensors")
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in weights.items()}, dest / "model.safetensors")
    return dest
