"""llama.cpp as the reference of the benchmarks (coldstart.py, decode_real.py): where its Python
binding lives, and a GGUF (the real model's, or decode_real.py's export of the Qwen2.5-0.5B shape)
requantized by llama.cpp's own quantizer, made once per model and kind and cached."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

LLAMA_PYTHON = Path.home() / ".cache" / "hyprstream-bench" / "venv" / "bin" / "python"
QUANT_CACHE = Path.home() / ".cache" / "hyprstream-bench" / "coldstart"
BUILD_HINT = ("python3 -m venv --system-site-packages ~/.cache/hyprstream-bench/venv && "
              "~/.cache/hyprstream-bench/venv/bin/pip install llama-cpp-python   (a 15-25 min compile)")
# kind: (llama.cpp's ftype, made from: None is the GGUF given). Q8_0 and Q4_K_M are made from
# the F16 file, as llama.cpp's users quantize: requantized straight from Q4_1, Q8_0 answers, like the
# Q4_1 file itself, "L'Étoile, la Cité, ..." (greedy decoding on a 135M model tips on small differences).
KINDS = {"F16": ("LLAMA_FTYPE_MOSTLY_F16", None), "BF16": ("LLAMA_FTYPE_MOSTLY_BF16", None),
         "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "F16"), "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "F16")}
QUANTIZE = """import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
params.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def llama_files(python: str, gguf: Path, kinds: list[str], *, stem: str | None = None,
                given: dict[str, Path] | None = None) -> dict[str, Path]:
    """`gguf` requantized to each of `kinds` (and what they are made from) into QUANT_CACHE, once.

    The cache key is `stem` (default: the GGUF's name less its last suffix, "SmolLM2-135M-Instruct"
    for the Q4_1 file) and the kind. `given`: kinds already at hand (the file itself is used, and
    what is made from that kind is made from it)."""
    QUANT_CACHE.mkdir(parents=True, exist_ok=True)
    stem = stem or gguf.stem.rsplit(".", 1)[0]
    files: dict[str, Path] = dict(given or {})
    needed = list(dict.fromkeys([s for k in kinds if (s := KINDS[k][1])] + kinds))  # sources first
    for kind in needed:
        if kind in files:
            continue
        ftype, source = KINDS[kind]
        dest = QUANT_CACHE / f"{stem}.{kind}.gguf"
        if not dest.is_file():
            print(f"llama.cpp: making {dest.name}...", flush=True)
            part = dest.with_name(dest.name + ".incomplete")
            done = subprocess.run([python, "-c", QUANTIZE, str(files[source] if source else gguf), str(part), ftype],
                                  capture_output=True, text=True)
            if done.returncode:
                part.unlink(missing_ok=True)
                raise SystemExit(f"llama.cpp could not make {dest.name} (exit {done.returncode}):\n"
                                 f"{(done.stdout + done.stderr)[-3000:]}")
            os.replace(part, dest)
        files[kind] = dest
    return files


def prune(prefix: str, keep: str) -> None:
    """Cached files of an older `prefix` model (another digest of it) than `keep`: a content-keyed
    cache would otherwise grow by a model per change of the exporter."""
    if QUANT_CACHE.is_dir():
        for old in [*QUANT_CACHE.glob(f"{prefix}*.gguf"), *QUANT_CACHE.glob(f"{prefix}*.incomplete")]:
            if not old.name.startswith(keep + "."):
                old.unlink(missing_ok=True)
